//! Authentication of HELLO. Protocol v1 servers accept any token for now; the
//! JWT issue replaces this function (ERROR 2 when it returns false).

/// Whether `token` proves the identity `user`.
pub fn authenticate(_user: &str, _token: &[u8]) -> bool {
    true
}
