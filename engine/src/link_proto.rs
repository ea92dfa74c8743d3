//! The node link between an edge (any process holding client connections)
//! and a core node, sans-IO: the edge-to-core interface of engine::core
//! (`Mail`) on the wire. Framing as the client protocol: `u32 len` (type +
//! payload), `u8 type`, payload; integers little-endian; `str` is `u8 len` +
//! UTF-8. Frames are written in batches (everything one event-loop turn
//! produced, in one write).
//!
//! A connection on the edge is named by `conn`: its slot and generation in
//! the edge core's arena (`u32 slot, u32 generation`); the link itself names
//! the edge core.
//!
//! | type | name | dir | payload |
//! |------|------|-----|---------|
//! | 0x01 | HELLO | E→C | u32 magic "IRLK", u8 version, u8 kind (0 edge, 1 probe), u64 topology hash, str name |
//! | 0x02 | WELCOME | C→E | u8 role (1 primary, 0 not), u64 epoch, u16 pair, str node |
//! | 0x03 | REFUSE | either | str reason (then close) |
//! | 0x04 | ROLE | C→E | u8 role, u64 epoch: the node's role changed (promotion, fencing) |
//! | 0x05 | PING | E→C | u64 now_ms (the core answers PONG) |
//! | 0x06 | PONG | C→E | u64 now_ms (echoed) |
//! | 0x10 | LOGIN | E→C | conn, str user |
//! | 0x11 | SEND | E→C | conn, id16 msg_id, u64 sent_ms, str sender, str to, body (the rest) |
//! | 0x12 | ACK | E→C | u64 seq, str user |
//! | 0x13 | LOGOUT | E→C | conn, str user |
//! | 0x14 | REWIND | E→C | conn, u64 seq, str user |
//! | 0x15 | RESUME | E→C | conn, str user |
//! | 0x16 | SYNC | E→C | conn, u64 nonce, str user: answered SYNCED once every earlier request for `user` from this link took effect (a client's PING after an ACK) |
//! | 0x20 | WELCOME_USER | C→E | conn, u64 pending |
//! | 0x21 | STORED | C→E | conn, id16 msg_id |
//! | 0x22 | REJECTED | C→E | conn, id16 msg_id, u16 code, str reason |
//! | 0x23 | DELIVER | C→E | conn, u64 seq, id16 msg_id, u64 sent_ms, str from, body (the rest) |
//! | 0x24 | RETRY | C→E | conn, id16 msg_id: this node does not take writes (a replica, fenced, stopping); the edge sends the SEND again to the pair's primary |
//! | 0x25 | SYNCED | C→E | conn, u64 nonce |
//! | 0x26 | MOVED | C→E | u32 version, u16 first, u16 last, u16 owner, u16 handoff_to (0xFFFF: none): a slot decision (engine::slots); sent after WELCOME for every decision the node knows, with ROLE, and when one is made. The edge sends the range's unanswered SENDs and logins to the owner |
//!
//! Every user id field of a request (E→C: LOGIN, SEND's sender and to, ACK,
//! LOGOUT, REWIND, RESUME, SYNC) obeys the user id rule (net::check_user_id,
//! docs/PROTOCOL.md 6c) or the frame is `ProtoError::BadUserId`: the core
//! closes the link and logs it, as for any bad bytes. DELIVER's `from` (C→E)
//! is not checked: it was checked when it entered, and a message stored
//! before the rule existed must not cut an edge's link.
//!
//! A HELLO whose topology hash differs from the core's is answered REFUSE on
//! the core and the edge logs the mismatch too: two processes that disagree
//! on who owns a slot never exchange a request.

use net::MsgId;

pub const MAGIC: u32 = u32::from_le_bytes(*b"IRLK");
pub const VERSION: u8 = 1;
/// Largest link frame: a SEND or DELIVER of the largest client frame plus
/// the ids around it (frame_len_max is at most 16 MiB, net::limits).
pub const FRAME_LEN_MAX: u32 = (16 << 20) + 1024;

mod t {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const REFUSE: u8 = 0x03;
    pub const ROLE: u8 = 0x04;
    pub const PING: u8 = 0x05;
    pub const PONG: u8 = 0x06;
    pub const LOGIN: u8 = 0x10;
    pub const SEND: u8 = 0x11;
    pub const ACK: u8 = 0x12;
    pub const LOGOUT: u8 = 0x13;
    pub const REWIND: u8 = 0x14;
    pub const RESUME: u8 = 0x15;
    pub const SYNC: u8 = 0x16;
    pub const WELCOME_USER: u8 = 0x20;
    pub const STORED: u8 = 0x21;
    pub const REJECTED: u8 = 0x22;
    pub const DELIVER: u8 = 0x23;
    pub const RETRY: u8 = 0x24;
    pub const SYNCED: u8 = 0x25;
    pub const MOVED: u8 = 0x26;
}

/// A connection on the edge: its slot and generation in the edge core's arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conn {
    pub slot: u32,
    pub generation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloKind {
    /// An edge core that will send requests.
    Edge,
    /// A node asking its peer's role at startup; closes after WELCOME.
    Probe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg<'a> {
    Hello {
        kind: HelloKind,
        topology: u64,
        name: &'a str,
    },
    Welcome {
        primary: bool,
        epoch: u64,
        pair: u16,
        node: &'a str,
    },
    Refuse {
        reason: &'a str,
    },
    Role {
        primary: bool,
        epoch: u64,
    },
    Ping {
        now_ms: u64,
    },
    Pong {
        now_ms: u64,
    },
    Login {
        conn: Conn,
        user: &'a str,
    },
    Send {
        conn: Conn,
        msg_id: MsgId,
        sent_ms: u64,
        sender: &'a str,
        to: &'a str,
        body: &'a [u8],
    },
    Ack {
        seq: u64,
        user: &'a str,
    },
    Logout {
        conn: Conn,
        user: &'a str,
    },
    Rewind {
        conn: Conn,
        seq: u64,
        user: &'a str,
    },
    Resume {
        conn: Conn,
        user: &'a str,
    },
    Sync {
        conn: Conn,
        nonce: u64,
        user: &'a str,
    },
    WelcomeUser {
        conn: Conn,
        pending: u64,
    },
    Stored {
        conn: Conn,
        msg_id: MsgId,
    },
    Rejected {
        conn: Conn,
        msg_id: MsgId,
        code: u16,
        reason: &'a str,
    },
    Deliver {
        conn: Conn,
        seq: u64,
        msg_id: MsgId,
        sent_ms: u64,
        from: &'a str,
        body: &'a [u8],
    },
    Retry {
        conn: Conn,
        msg_id: MsgId,
    },
    Moved(crate::record::SlotsRecord),
    Synced {
        conn: Conn,
        nonce: u64,
    },
}

/// Bad bytes from a link peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("link frame length {0} is 0 or over {FRAME_LEN_MAX}")]
    BadLength(u32),
    #[error("unknown link frame type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed link frame: {0}")]
    Malformed(&'static str),
    #[error("not an Iris node link peer (bad magic or version)")]
    BadMagic,
    /// A user id field of an edge's request breaks the user id rule
    /// (net::check_user_id): a core trusts no user id it did not check.
    #[error("bad user id in a node link frame: {0}")]
    BadUserId(#[from] net::UserIdError),
}

fn frame(out: &mut Vec<u8>, ty: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(ty);
    body(out);
    let len = (out.len() - start - 4) as u32;
    assert!(len <= FRAME_LEN_MAX, "link frame over its bound");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = net::codec::truncate_str(s, 255);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn put_conn(out: &mut Vec<u8>, c: &Conn) {
    out.extend_from_slice(&c.slot.to_le_bytes());
    out.extend_from_slice(&c.generation.to_le_bytes());
}

pub fn encode(msg: &Msg<'_>, out: &mut Vec<u8>) {
    match msg {
        Msg::Hello {
            kind,
            topology,
            name,
        } => frame(out, t::HELLO, |o| {
            o.extend_from_slice(&MAGIC.to_le_bytes());
            o.push(VERSION);
            o.push(match kind {
                HelloKind::Edge => 0,
                HelloKind::Probe => 1,
            });
            o.extend_from_slice(&topology.to_le_bytes());
            put_str(o, name);
        }),
        Msg::Welcome {
            primary,
            epoch,
            pair,
            node,
        } => frame(out, t::WELCOME, |o| {
            o.push(u8::from(*primary));
            o.extend_from_slice(&epoch.to_le_bytes());
            o.extend_from_slice(&pair.to_le_bytes());
            put_str(o, node);
        }),
        Msg::Refuse { reason } => frame(out, t::REFUSE, |o| put_str(o, reason)),
        Msg::Role { primary, epoch } => frame(out, t::ROLE, |o| {
            o.push(u8::from(*primary));
            o.extend_from_slice(&epoch.to_le_bytes());
        }),
        Msg::Ping { now_ms } => frame(out, t::PING, |o| o.extend_from_slice(&now_ms.to_le_bytes())),
        Msg::Pong { now_ms } => frame(out, t::PONG, |o| o.extend_from_slice(&now_ms.to_le_bytes())),
        Msg::Login { conn, user } => frame(out, t::LOGIN, |o| {
            put_conn(o, conn);
            put_str(o, user);
        }),
        Msg::Send {
            conn,
            msg_id,
            sent_ms,
            sender,
            to,
            body,
        } => frame(out, t::SEND, |o| {
            put_conn(o, conn);
            o.extend_from_slice(msg_id);
            o.extend_from_slice(&sent_ms.to_le_bytes());
            put_str(o, sender);
            put_str(o, to);
            o.extend_from_slice(body);
        }),
        Msg::Ack { seq, user } => frame(out, t::ACK, |o| {
            o.extend_from_slice(&seq.to_le_bytes());
            put_str(o, user);
        }),
        Msg::Logout { conn, user } => frame(out, t::LOGOUT, |o| {
            put_conn(o, conn);
            put_str(o, user);
        }),
        Msg::Rewind { conn, seq, user } => frame(out, t::REWIND, |o| {
            put_conn(o, conn);
            o.extend_from_slice(&seq.to_le_bytes());
            put_str(o, user);
        }),
        Msg::Resume { conn, user } => frame(out, t::RESUME, |o| {
            put_conn(o, conn);
            put_str(o, user);
        }),
        Msg::Sync { conn, nonce, user } => frame(out, t::SYNC, |o| {
            put_conn(o, conn);
            o.extend_from_slice(&nonce.to_le_bytes());
            put_str(o, user);
        }),
        Msg::Synced { conn, nonce } => frame(out, t::SYNCED, |o| {
            put_conn(o, conn);
            o.extend_from_slice(&nonce.to_le_bytes());
        }),
        Msg::Moved(r) => frame(out, t::MOVED, |o| {
            // The SLOTS record's payload: one layout for the log and the link.
            let mut payload = Vec::with_capacity(12);
            crate::record::encode_slots(r, &mut payload);
            o.extend_from_slice(&payload);
        }),
        Msg::WelcomeUser { conn, pending } => frame(out, t::WELCOME_USER, |o| {
            put_conn(o, conn);
            o.extend_from_slice(&pending.to_le_bytes());
        }),
        Msg::Stored { conn, msg_id } => frame(out, t::STORED, |o| {
            put_conn(o, conn);
            o.extend_from_slice(msg_id);
        }),
        Msg::Rejected {
            conn,
            msg_id,
            code,
            reason,
        } => frame(out, t::REJECTED, |o| {
            put_conn(o, conn);
            o.extend_from_slice(msg_id);
            o.extend_from_slice(&code.to_le_bytes());
            put_str(o, reason);
        }),
        Msg::Deliver {
            conn,
            seq,
            msg_id,
            sent_ms,
            from,
            body,
        } => frame(out, t::DELIVER, |o| {
            put_conn(o, conn);
            o.extend_from_slice(&seq.to_le_bytes());
            o.extend_from_slice(msg_id);
            o.extend_from_slice(&sent_ms.to_le_bytes());
            put_str(o, from);
            o.extend_from_slice(body);
        }),
        Msg::Retry { conn, msg_id } => frame(out, t::RETRY, |o| {
            put_conn(o, conn);
            o.extend_from_slice(msg_id);
        }),
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Malformed("truncated field"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Malformed("flag not 0 or 1")),
        }
    }
    fn id(&mut self) -> Result<MsgId, ProtoError> {
        Ok(self.take(16)?.try_into().expect("16"))
    }
    fn conn(&mut self) -> Result<Conn, ProtoError> {
        Ok(Conn {
            slot: self.u32()?,
            generation: self.u32()?,
        })
    }
    fn str(&mut self) -> Result<&'a str, ProtoError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| ProtoError::Malformed("invalid UTF-8"))
    }
    /// A user id field of a request (edge to core): a `str` that must obey
    /// the user id rule, with the protocol's length bound
    /// (`USER_ID_LEN_MAX_DEFAULT`: a server's `net::Limits` never changes it,
    /// engine::config).
    fn user(&mut self) -> Result<&'a str, ProtoError> {
        let n = self.u8()? as usize;
        let bytes = self.take(n)?;
        Ok(net::user_id_from_bytes(
            bytes,
            net::limits::USER_ID_LEN_MAX_DEFAULT,
        )?)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn done(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes"))
        }
    }
}

/// The length of the whole frame at the start of `buf` (header included),
/// checked against its bound as soon as the 4 length bytes are there;
/// Ok(None) until the whole frame is in `buf`.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(header.try_into().expect("4"));
    if len == 0 || len > FRAME_LEN_MAX {
        return Err(ProtoError::BadLength(len));
    }
    let total = 4 + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// Ok(None): not a whole frame yet. Ok(Some((msg, consumed))) otherwise.
pub fn decode(buf: &[u8]) -> Result<Option<(Msg<'_>, usize)>, ProtoError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    let mut c = Cursor(&buf[5..total]);
    let msg = match buf[4] {
        t::HELLO => {
            if c.u32()? != MAGIC || c.u8()? != VERSION {
                return Err(ProtoError::BadMagic);
            }
            let kind = match c.u8()? {
                0 => HelloKind::Edge,
                1 => HelloKind::Probe,
                _ => return Err(ProtoError::Malformed("hello kind")),
            };
            Msg::Hello {
                kind,
                topology: c.u64()?,
                name: c.str()?,
            }
        }
        t::WELCOME => Msg::Welcome {
            primary: c.bool()?,
            epoch: c.u64()?,
            pair: c.u16()?,
            node: c.str()?,
        },
        t::REFUSE => Msg::Refuse { reason: c.str()? },
        t::ROLE => Msg::Role {
            primary: c.bool()?,
            epoch: c.u64()?,
        },
        t::PING => Msg::Ping { now_ms: c.u64()? },
        t::PONG => Msg::Pong { now_ms: c.u64()? },
        t::LOGIN => Msg::Login {
            conn: c.conn()?,
            user: c.user()?,
        },
        t::SEND => Msg::Send {
            conn: c.conn()?,
            msg_id: c.id()?,
            sent_ms: c.u64()?,
            sender: c.user()?,
            to: c.user()?,
            body: c.rest(),
        },
        t::ACK => Msg::Ack {
            seq: c.u64()?,
            user: c.user()?,
        },
        t::LOGOUT => Msg::Logout {
            conn: c.conn()?,
            user: c.user()?,
        },
        t::REWIND => Msg::Rewind {
            conn: c.conn()?,
            seq: c.u64()?,
            user: c.user()?,
        },
        t::RESUME => Msg::Resume {
            conn: c.conn()?,
            user: c.user()?,
        },
        t::SYNC => Msg::Sync {
            conn: c.conn()?,
            nonce: c.u64()?,
            user: c.user()?,
        },
        t::SYNCED => Msg::Synced {
            conn: c.conn()?,
            nonce: c.u64()?,
        },
        t::MOVED => match crate::record::decode(crate::record::SLOTS, c.rest()) {
            Ok(crate::record::Decoded::Slots(r)) => Msg::Moved(r),
            _ => return Err(ProtoError::Malformed("slot decision")),
        },
        t::WELCOME_USER => Msg::WelcomeUser {
            conn: c.conn()?,
            pending: c.u64()?,
        },
        t::STORED => Msg::Stored {
            conn: c.conn()?,
            msg_id: c.id()?,
        },
        t::REJECTED => Msg::Rejected {
            conn: c.conn()?,
            msg_id: c.id()?,
            code: c.u16()?,
            reason: c.str()?,
        },
        t::DELIVER => Msg::Deliver {
            conn: c.conn()?,
            seq: c.u64()?,
            msg_id: c.id()?,
            sent_ms: c.u64()?,
            from: c.str()?,
            body: c.rest(),
        },
        t::RETRY => Msg::Retry {
            conn: c.conn()?,
            msg_id: c.id()?,
        },
        other => return Err(ProtoError::UnknownType(other)),
    };
    c.done()?;
    Ok(Some((msg, total)))
}

/// Entry points for fuzzers (engine/fuzz). Thin wrappers, so the targets cannot rot.
#[doc(hidden)]
pub mod fuzzing {
    use super::{decode, encode, frame_len, ProtoError};

    /// Decodes every frame in `data` as a stream; asserts what must hold for
    /// any input: `frame_len` and `decode` agree, progress stays in bounds,
    /// and a decoded frame re-encodes to exactly its bytes.
    pub fn decode_link(data: &[u8]) {
        let mut rest = data;
        loop {
            let len = frame_len(rest);
            let decoded = decode(rest);
            match (&len, &decoded) {
                (Ok(None), Ok(None)) => break,
                (Err(a), Err(b)) => {
                    assert_eq!(a, b);
                    assert!(matches!(a, ProtoError::BadLength(_)));
                    break;
                }
                (Ok(Some(n)), Err(e)) => {
                    assert!(*n >= 5 && *n <= rest.len());
                    assert!(!matches!(e, ProtoError::BadLength(_)), "{e:?}");
                    rest = &rest[*n..];
                }
                (Ok(Some(n)), Ok(Some((msg, consumed)))) => {
                    assert_eq!(n, consumed);
                    let mut out = Vec::new();
                    encode(msg, &mut out);
                    assert_eq!(out, &rest[..*consumed], "{msg:?}");
                    rest = &rest[*consumed..];
                }
                _ => panic!("frame_len {len:?} and decode {decoded:?} disagree"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: Conn = Conn {
        slot: 7,
        generation: 3,
    };

    fn all() -> Vec<Msg<'static>> {
        vec![
            Msg::Hello {
                kind: HelloKind::Edge,
                topology: 0xfeed,
                name: "e0",
            },
            Msg::Hello {
                kind: HelloKind::Probe,
                topology: 1,
                name: "p0b",
            },
            Msg::Welcome {
                primary: true,
                epoch: 9,
                pair: 2,
                node: "p0a",
            },
            Msg::Refuse { reason: "no" },
            Msg::Role {
                primary: false,
                epoch: 10,
            },
            Msg::Ping { now_ms: 5 },
            Msg::Pong { now_ms: 5 },
            Msg::Login { conn: C, user: "a" },
            Msg::Send {
                conn: C,
                msg_id: [1; 16],
                sent_ms: 42,
                sender: "a",
                to: "b",
                body: b"hi",
            },
            Msg::Ack { seq: 4, user: "b" },
            Msg::Logout { conn: C, user: "a" },
            Msg::Rewind {
                conn: C,
                seq: 8,
                user: "a",
            },
            Msg::Resume { conn: C, user: "a" },
            Msg::WelcomeUser {
                conn: C,
                pending: 3,
            },
            Msg::Stored {
                conn: C,
                msg_id: [2; 16],
            },
            Msg::Rejected {
                conn: C,
                msg_id: [3; 16],
                code: 5,
                reason: "full",
            },
            Msg::Deliver {
                conn: C,
                seq: 1,
                msg_id: [4; 16],
                sent_ms: 9,
                from: "a",
                body: b"",
            },
            Msg::Retry {
                conn: C,
                msg_id: [5; 16],
            },
            Msg::Sync {
                conn: C,
                nonce: 7,
                user: "b",
            },
            Msg::Synced { conn: C, nonce: 7 },
            Msg::Moved(crate::record::SlotsRecord {
                version: 3,
                first: 1,
                last: 16383,
                owner: 1,
                handoff_to: Some(0),
            }),
            Msg::Moved(crate::record::SlotsRecord {
                version: 4,
                first: 9,
                last: 9,
                owner: 0,
                handoff_to: None,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_and_partial_input_waits() {
        for msg in all() {
            let mut out = Vec::new();
            encode(&msg, &mut out);
            for cut in 0..out.len() {
                assert_eq!(decode(&out[..cut]), Ok(None), "{msg:?} cut at {cut}");
            }
            assert_eq!(decode(&out), Ok(Some((msg.clone(), out.len()))));
        }
    }

    /// The core trusts no user id from a link (issue 21, item 2): every user
    /// id field of an edge's request obeys net::check_user_id, or the frame
    /// is a typed error (the link is closed). Red with `Cursor::user`
    /// planted back to `Cursor::str`: every frame below decoded.
    #[test]
    fn user_ids_from_an_edge_obey_the_rule() {
        let evil = "\u{1b}[2J".repeat(20); // 80 bytes of terminal control
        for bad in [
            "eve#",
            "bob/alice",
            "+",
            "a\0b",
            "nel\u{85}",
            "",
            evil.as_str(),
        ] {
            let sender_bad = Msg::Send {
                conn: C,
                msg_id: [1; 16],
                sent_ms: 1,
                sender: bad,
                to: "bob",
                body: b"hi",
            };
            let to_bad = Msg::Send {
                conn: C,
                msg_id: [1; 16],
                sent_ms: 1,
                sender: "alice",
                to: bad,
                body: b"hi",
            };
            for msg in [
                Msg::Login { conn: C, user: bad },
                sender_bad,
                to_bad,
                Msg::Ack { seq: 1, user: bad },
                Msg::Logout { conn: C, user: bad },
                Msg::Rewind {
                    conn: C,
                    seq: 1,
                    user: bad,
                },
                Msg::Resume { conn: C, user: bad },
                Msg::Sync {
                    conn: C,
                    nonce: 1,
                    user: bad,
                },
            ] {
                let mut out = Vec::new();
                encode(&msg, &mut out);
                assert!(
                    matches!(decode(&out), Err(ProtoError::BadUserId(_))),
                    "{msg:?} decoded as {:?}",
                    decode(&out)
                );
            }
        }
        // The sender of a DELIVER (core to edge) was checked when it entered;
        // a message stored before the rule must not cut the edge's link.
        let old = Msg::Deliver {
            conn: C,
            seq: 1,
            msg_id: [4; 16],
            sent_ms: 9,
            from: "eve#",
            body: b"",
        };
        let mut out = Vec::new();
        encode(&old, &mut out);
        assert_eq!(decode(&out), Ok(Some((old, out.len()))));
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(decode(&[0, 0, 0, 0]), Err(ProtoError::BadLength(0)));
        let huge = (FRAME_LEN_MAX + 1).to_le_bytes();
        assert!(matches!(decode(&huge), Err(ProtoError::BadLength(_))));
        assert_eq!(
            decode(&[1, 0, 0, 0, 0x7f]),
            Err(ProtoError::UnknownType(0x7f))
        );
        let mut hello = Vec::new();
        encode(
            &Msg::Hello {
                kind: HelloKind::Edge,
                topology: 1,
                name: "x",
            },
            &mut hello,
        );
        hello[5] ^= 1; // magic
        assert_eq!(decode(&hello), Err(ProtoError::BadMagic));
        let mut login = Vec::new();
        encode(&Msg::Login { conn: C, user: "a" }, &mut login);
        login.push(0);
        login[0] += 1;
        assert_eq!(decode(&login), Err(ProtoError::Malformed("trailing bytes")));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            fuzzing::decode_link(&data);
        }

        #[test]
        fn plausible_frames_never_panic_the_decoder(
            ty in prop_oneof![Just(0x01u8), 0x02u8..0x07, 0x10u8..0x17, 0x20u8..0x27, any::<u8>()],
            body in proptest::collection::vec(any::<u8>(), 0..96),
        ) {
            let mut data = ((body.len() + 1) as u32).to_le_bytes().to_vec();
            data.push(ty);
            data.extend_from_slice(&body);
            fuzzing::decode_link(&data);
        }

        #[test]
        fn sends_and_delivers_round_trip(
            slot in any::<u32>(), generation in any::<u32>(), id in any::<[u8; 16]>(),
            seq in any::<u64>(), sent in any::<u64>(),
            a in "[a-z0-9]{1,40}", b in "[a-z0-9]{1,40}",
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let conn = Conn { slot, generation };
            for msg in [
                Msg::Send { conn, msg_id: id, sent_ms: sent, sender: &a, to: &b, body: &body },
                Msg::Deliver { conn, seq, msg_id: id, sent_ms: sent, from: &a, body: &body },
            ] {
                let mut out = Vec::new();
                encode(&msg, &mut out);
                prop_assert_eq!(decode(&out), Ok(Some((msg.clone(), out.len()))));
            }
        }
    }
}
