//! The one rule for user ids (docs/PROTOCOL.md 6, "user id"), checked
//! wherever a user id enters a process: a client's HELLO, a JWT's `sub`, an
//! MQTT CONNECT's user name, the recipient of a SEND or of an MQTT PUBLISH
//! to `inbox/<user>`, and every user id field of a node-link frame.
//!
//! A user id is printed in logs and terminals and becomes an MQTT topic
//! level (`inbox/<user>`, `inbox/<user>/<sender>`), so beside its length it
//! must carry no control character (they rewrite what a terminal shows) and
//! none of MQTT's level separator and wildcards (a sender `alice/evil` would
//! be read as `alice`, and `eve#` is a wildcard in a topic name, which MQTT
//! forbids).

use crate::limits::{Limits, STR_LEN_MAX};

/// Characters no user id contains: MQTT's topic level separator and its two
/// wildcards.
pub const USER_ID_RESERVED_CHARS: [char; 3] = ['/', '+', '#'];

/// Why a user id breaks the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("user id is not valid UTF-8")]
    NotUtf8,
    #[error("user id is empty")]
    Empty,
    #[error("user id is {len} bytes, over {max}")]
    TooLong { len: usize, max: usize },
    #[error("user id contains the control character U+{0:04X}")]
    Control(u32),
    #[error("user id contains {0:?} (MQTT's level separator and wildcards are not allowed)")]
    Reserved(char),
}

/// The rule: 1..=`len_max` bytes (never more than a `str` field's 255) of
/// UTF-8 (a `&str` already is), no control character (Unicode general
/// category Cc: U+0000..=U+001F and U+007F..=U+009F, `char::is_control`), and
/// none of [`USER_ID_RESERVED_CHARS`].
pub fn check_user_id(user: &str, len_max: usize) -> Result<(), UserIdError> {
    let max = len_max.min(STR_LEN_MAX);
    if user.is_empty() {
        return Err(UserIdError::Empty);
    }
    if user.len() > max {
        return Err(UserIdError::TooLong {
            len: user.len(),
            max,
        });
    }
    for ch in user.chars() {
        if ch.is_control() {
            return Err(UserIdError::Control(u32::from(ch)));
        }
        if USER_ID_RESERVED_CHARS.contains(&ch) {
            return Err(UserIdError::Reserved(ch));
        }
    }
    Ok(())
}

/// [`check_user_id`] of raw bytes (a wire field not yet known to be UTF-8).
pub fn user_id_from_bytes(bytes: &[u8], len_max: usize) -> Result<&str, UserIdError> {
    let user = std::str::from_utf8(bytes).map_err(|_| UserIdError::NotUtf8)?;
    check_user_id(user, len_max)?;
    Ok(user)
}

/// [`check_user_id`] with the length bound of `limits`.
pub fn valid_user_id(user: &str, limits: &Limits) -> bool {
    check_user_id(user, limits.user_id_len_max).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::USER_ID_LEN_MAX_DEFAULT;
    use proptest::prelude::*;

    const MAX: usize = USER_ID_LEN_MAX_DEFAULT;

    #[test]
    fn accepted_ids() {
        for good in ["alice", "żółw 🐢", "a.b-c_d@e", "bob alice", "x"] {
            assert_eq!(check_user_id(good, MAX), Ok(()), "{good:?}");
        }
        assert_eq!(check_user_id(&"x".repeat(64), MAX), Ok(()));
        // 64 bytes, not 64 chars: 32 two-byte chars fit, 33 do not.
        assert_eq!(check_user_id(&"é".repeat(32), MAX), Ok(()));
    }

    #[test]
    fn refused_ids_say_why() {
        assert_eq!(check_user_id("", MAX), Err(UserIdError::Empty));
        assert_eq!(
            check_user_id(&"x".repeat(65), MAX),
            Err(UserIdError::TooLong { len: 65, max: 64 })
        );
        assert_eq!(
            check_user_id(&"é".repeat(33), MAX),
            Err(UserIdError::TooLong { len: 66, max: 64 })
        );
        // A limit above a str field's 255 bytes is cut to 255.
        assert_eq!(
            check_user_id(&"x".repeat(256), 1000),
            Err(UserIdError::TooLong { len: 256, max: 255 })
        );
        for (bad, code) in [
            ("a\0b", 0x00),
            ("tab\t", 0x09),
            ("nl\n", 0x0a),
            ("\x1b[31m", 0x1b),
            ("del\x7f", 0x7f),
            ("c1\u{85}", 0x85), // NEL: a C1 control, two bytes of UTF-8
            ("csi\u{9b}", 0x9b),
        ] {
            assert_eq!(
                check_user_id(bad, MAX),
                Err(UserIdError::Control(code)),
                "{bad:?}"
            );
        }
        for (bad, ch) in [("bob/alice", '/'), ("eve#", '#'), ("+", '+'), ("/", '/')] {
            assert_eq!(
                check_user_id(bad, MAX),
                Err(UserIdError::Reserved(ch)),
                "{bad:?}"
            );
        }
        assert_eq!(
            user_id_from_bytes(b"\xff\xfe", MAX),
            Err(UserIdError::NotUtf8)
        );
        assert_eq!(user_id_from_bytes(b"bob", MAX), Ok("bob"));
        assert!(!valid_user_id("eve#", &Limits::default()));
        assert!(valid_user_id("eve", &Limits::default()));
    }

    proptest! {
        /// The rule, restated char by char: any string is accepted exactly
        /// when it is 1..=64 bytes with no Cc char and no `/`, `+`, `#`.
        #[test]
        fn rule_matches_its_statement(user in "\\PC{0,4}[\\x00-\\x7f\\u{80}-\\u{a0}/+#]?\\PC{0,70}") {
            let expected = !user.is_empty()
                && user.len() <= MAX
                && !user.chars().any(|c| c.is_control() || matches!(c, '/' | '+' | '#'));
            prop_assert_eq!(check_user_id(&user, MAX).is_ok(), expected);
            prop_assert_eq!(
                user_id_from_bytes(user.as_bytes(), MAX).is_ok(),
                expected
            );
        }

        /// Whatever the bytes, the check returns (never panics), and an
        /// accepted id is valid UTF-8 of at most the bound.
        #[test]
        fn any_bytes_are_answered(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(user) = user_id_from_bytes(&bytes, MAX) {
                prop_assert!(!user.is_empty() && user.len() <= MAX);
                prop_assert!(!user.chars().any(char::is_control));
            }
        }
    }
}
