//! Opening one benchmark connection: TCP connect, then the protocol's greeting
//! (Iris HELLO/WELCOME, or a Redis PING/PONG so both count a connection only
//! once the server has answered on it). Blocking, with deadlines.

use crate::conn::Stream;
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

/// How a driver logs in and whether it speaks TLS: a fixed token (Iris
/// `--auth none` takes anything), or a JWT signed per user with a private
/// key (`--token-key`, for `--auth jwt`); TLS trusting a CA file.
#[derive(Clone, Default)]
pub struct Access {
    pub token: String,
    pub signer: Option<std::sync::Arc<engine::auth::dev::Signer>>,
    pub tls: Option<net::TlsSettings>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("signed_tokens", &self.signer.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// How long the tokens a driver signs stay valid.
const TOKEN_TTL_S: u64 = 24 * 3600;

impl Access {
    pub fn new(
        token: &str,
        token_key: Option<&std::path::Path>,
        tls_ca: Option<&std::path::Path>,
        tls_name: &str,
    ) -> Result<Access, String> {
        let signer = token_key
            .map(|k| engine::auth::dev::Signer::load(k).map(std::sync::Arc::new))
            .transpose()?;
        let tls = tls_ca
            .map(|ca| net::TlsSettings::from_ca_file(ca, tls_name).map_err(|e| e.to_string()))
            .transpose()?;
        Ok(Access {
            token: token.to_string(),
            signer,
            tls,
        })
    }

    pub fn token_for(&self, user: &str) -> Result<Vec<u8>, String> {
        match &self.signer {
            Some(s) => Ok(s
                .token(user, TOKEN_TTL_S, engine::auth::now_s())?
                .into_bytes()),
            None => Ok(self.token.clone().into_bytes()),
        }
    }
}

/// Connects to `addr` and completes the greeting as `user` within `timeout`.
pub fn connect(
    addr: SocketAddr,
    proto: Proto,
    user: &str,
    access: &Access,
    timeout: Duration,
) -> Result<(Stream, Greeting), String> {
    let deadline = Instant::now() + timeout;
    let token = access.token_for(user)?;
    let token = token.as_slice();
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let mut stream = match &access.tls {
        None => Stream::Plain(tcp),
        Some(tls) => net::tls_connect(tcp, tls, timeout).map_err(|e| format!("TLS: {e}"))?,
    };
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
            .tcp()
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
