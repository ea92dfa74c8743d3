//! The little of RESP (the Redis protocol) the peer comparison needs: LPUSH
//! and PING requests, and simple-string, error and integer replies.
//!
//! Like the Iris codec, sans-IO: bytes in, bytes or replies out.

/// Longest reply line accepted; a longer one is a protocol error, not a wait.
pub const LINE_LEN_MAX: usize = 4096;

/// One reply the drivers understand.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `+OK`, `+PONG`.
    Simple(&'a str),
    /// `-ERR ...`.
    Error(&'a str),
    /// `:123`: LPUSH answers with the list length.
    Integer(i64),
}

/// The bytes of `LPUSH key <body>` up to the body: the body and `\r\n` follow.
pub fn lpush_prefix(key: &str, body_len: usize) -> Vec<u8> {
    format!(
        "*3\r\n$5\r\nLPUSH\r\n${}\r\n{key}\r\n${body_len}\r\n",
        key.len()
    )
    .into_bytes()
}

/// Appends a complete LPUSH command for `body` after its precomputed `prefix`.
pub fn encode_lpush(prefix: &[u8], body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(prefix);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

pub const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// Decodes one reply from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn decode_reply(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, String> {
    let scan = &buf[..buf.len().min(LINE_LEN_MAX)];
    let Some(cr) = scan.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= LINE_LEN_MAX {
            return Err(format!("reply line longer than {LINE_LEN_MAX} bytes"));
        }
        return Ok(None);
    };
    if cr == 0 {
        return Err("empty reply line".to_string());
    }
    let text = std::str::from_utf8(&buf[1..cr]).map_err(|_| "reply is not UTF-8".to_string())?;
    let reply = match buf[0] {
        b'+' => Reply::Simple(text),
        b'-' => Reply::Error(text),
        b':' => Reply::Integer(
            text.parse()
                .map_err(|_| format!("bad integer reply {text:?}"))?,
        ),
        other => return Err(format!("unexpected reply type {:?}", other as char)),
    };
    Ok(Some((reply, cr + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_lpush_as_resp_array() {
        let prefix = lpush_prefix("inbox:r1", 3);
        let mut out = Vec::new();
        encode_lpush(&prefix, b"abc", &mut out);
        assert_eq!(out, b"*3\r\n$5\r\nLPUSH\r\n$8\r\ninbox:r1\r\n$3\r\nabc\r\n");
    }

    #[test]
    fn decodes_replies_and_waits_for_more() {
        let buf = b":17\r\n+PONG\r\n-ERR oom\r\n:4";
        let (reply, used) = decode_reply(buf).unwrap().unwrap();
        assert_eq!((reply, used), (Reply::Integer(17), 5));
        let (reply, used2) = decode_reply(&buf[used..]).unwrap().unwrap();
        assert_eq!(reply, Reply::Simple("PONG"));
        let rest = &buf[used + used2..];
        let (reply, used3) = decode_reply(rest).unwrap().unwrap();
        assert_eq!(reply, Reply::Error("ERR oom"));
        assert_eq!(decode_reply(&rest[used3..]).unwrap(), None);
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        assert!(decode_reply(b"$3\r\nabc\r\n").is_err());
        assert!(decode_reply(b":x\r\n").is_err());
        assert!(decode_reply(&[b'+'; LINE_LEN_MAX + 1]).is_err());
    }
}
