//! Opening one benchmark connection: TCP connect, then the protocol's greeting
//! (Iris HELLO/WELCOME, or a Redis PING/PONG so both count a connection only
//! once the server has answered on it). Blocking, with deadlines.

use crate::resp;
use net::{ClientFrame, Limits, ServerFrame, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Which server the drivers talk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Iris,
    Redis,
}

/// Largest greeting reply read before giving up on a connection.
const GREETING_LEN_MAX: usize = 4096;

/// What the server said when the connection was accepted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Greeting {
    /// Iris WELCOME `pending`; 0 for Redis.
    pub pending: u64,
}

/// Connects to `addr` and completes the greeting as `user` within `timeout`.
pub fn connect(
    addr: SocketAddr,
    proto: Proto,
    user: &str,
    token: &[u8],
    timeout: Duration,
) -> Result<(TcpStream, Greeting), String> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let mut request = Vec::with_capacity(128);
    match proto {
        Proto::Iris => net::encode_client_frame(
            &ClientFrame::Hello {
                version: PROTOCOL_VERSION,
                user,
                token,
            },
            &mut request,
        ),
        Proto::Redis => request.extend_from_slice(resp::PING),
    }
    stream
        .write_all(&request)
        .map_err(|e| format!("greeting write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(greeting) = parse_greeting(proto, &buf)? {
            return Ok((stream, greeting));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || buf.len() > GREETING_LEN_MAX {
            return Err("greeting: no answer in time".to_string());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("read timeout: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err("greeting: server closed the connection".to_string()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("greeting read: {e}")),
        }
    }
}

fn parse_greeting(proto: Proto, buf: &[u8]) -> Result<Option<Greeting>, String> {
    match proto {
        Proto::Iris => match net::decode_server_frame(buf, &Limits::default()) {
            Ok(None) => Ok(None),
            Ok(Some((ServerFrame::Welcome { pending, .. }, _))) => Ok(Some(Greeting { pending })),
            Ok(Some((ServerFrame::Error { code, reason }, _))) => {
                Err(format!("greeting: ERROR {code} {reason}"))
            }
            Ok(Some((other, _))) => Err(format!("greeting: unexpected {other:?}")),
            Err(e) => Err(format!("greeting: {e}")),
        },
        Proto::Redis => match resp::decode_reply(buf)? {
            None => Ok(None),
            Some((resp::Reply::Simple("PONG"), _)) => Ok(Some(Greeting::default())),
            Some((other, _)) => Err(format!("greeting: unexpected {other:?}")),
        },
    }
}
