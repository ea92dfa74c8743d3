//! A minimal blocking HTTP/1.1 client for a node's admin server, over
//! `std::net`: one request per connection (`Connection: close`), every wait
//! and every read bounded, so a wedged node makes a command fail instead of
//! hang.

use crate::admin_auth::Token;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Per address tried when the admin address resolves to several.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Longer than the server's promotion wait (5 s), so a slow promotion is
/// reported by the server (503), not by our timeout.
pub const READ_TIMEOUT_MS: u64 = 10_000;
pub const WRITE_TIMEOUT_MS: u64 = 5_000;
/// Largest response accepted (head and body).
pub const RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Header lines parsed in a response.
pub const RESPONSE_HEADERS_MAX: usize = 32;

/// Sends `METHOD path` with no body and no credential to `addr`
/// (host:port): for the routes a node leaves public (`/health`,
/// `/metrics`). Returns the status code and the body.
pub fn http(method: &str, addr: &str, path: &str) -> Result<(u16, String), String> {
    AdminClient::new(addr, None).call(method, path)
}

/// The operator token a command sends: `flag`, the environment, the
/// cluster file's, or the default data directory's
/// (crate::admin_auth::client_token).
pub fn operator_token(
    flag: Option<&std::path::Path>,
    cluster_token_file: Option<&std::path::Path>,
) -> Result<Option<Token>, String> {
    crate::admin_auth::client_token(flag, cluster_token_file).map_err(|e| e.to_string())
}

/// A node's admin API as a client sees it: its address and the operator
/// token sent with every request (crate::admin_auth).
#[derive(Debug, Clone)]
pub struct AdminClient {
    pub addr: String,
    token: Option<Token>,
}

impl AdminClient {
    pub fn new(addr: impl Into<String>, token: Option<Token>) -> AdminClient {
        AdminClient {
            addr: addr.into(),
            token,
        }
    }

    /// `METHOD path` without a body; the status code and the body.
    pub fn call(&self, method: &str, path: &str) -> Result<(u16, String), String> {
        self.call_with_body(method, path, &[])
    }

    /// Like [`AdminClient::call`], with a request body (sent with its Content-Length).
    pub fn call_with_body(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, String), String> {
        let (status, body) =
            self.call_bytes(method, path, body, RESPONSE_BYTES_MAX, READ_TIMEOUT_MS)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Like [`AdminClient::call_with_body`], for a binary response of up to
    /// `response_max` bytes, waiting up to `read_timeout_ms` for each read.
    pub fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        response_max: usize,
        read_timeout_ms: u64,
    ) -> Result<(u16, Vec<u8>), String> {
        let authorization = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {}\r\n", t.as_str()))
            .unwrap_or_default();
        send(
            &self.addr,
            &format!("{method} {path}"),
            &authorization,
            body,
            response_max,
            read_timeout_ms,
        )
    }
}

fn send(
    addr: &str,
    request_line: &str,
    authorization: &str,
    body: &[u8],
    response_max: usize,
    read_timeout_ms: u64,
) -> Result<(u16, Vec<u8>), String> {
    let mut stream = connect(addr)?;
    stream
        .set_read_timeout(Some(Duration::from_millis(read_timeout_ms)))
        .map_err(|e| format!("{addr}: {e}"))?;
    let head = format!(
        "{request_line} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .map_err(|e| format!("sending to {addr}: {e}"))?;
    let response =
        read_bounded(&mut stream, response_max).map_err(|e| format!("reading from {addr}: {e}"))?;
    parse_response(&response).map_err(|e| format!("response from {addr}: {e}"))
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    let addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("admin address {addr}: {e}"))?;
    let mut last_error = format!("admin address {addr} resolves to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_millis(CONNECT_TIMEOUT_MS)) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_millis(READ_TIMEOUT_MS)))
                    .and_then(|()| {
                        stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)))
                    })
                    .map_err(|e| format!("{a}: {e}"))?;
                return Ok(stream);
            }
            Err(e) => last_error = format!("connecting to {a}: {e}"),
        }
    }
    Err(last_error)
}

/// Reads until the server closes, refusing more than `max` bytes.
fn read_bounded(stream: &mut TcpStream, max: usize) -> std::io::Result<Vec<u8>> {
    let mut response = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX) + 1;
    stream.take(limit).read_to_end(&mut response)?;
    if response.len() > max {
        return Err(std::io::Error::other(format!(
            "response larger than {max} bytes"
        )));
    }
    Ok(response)
}

fn parse_response(bytes: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("connection closed mid-head".into()),
        Err(e) => return Err(format!("malformed: {e}")),
    };
    let status = response.code.ok_or("no status code")?;
    let mut body = &bytes[head_len..];
    let content_length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    if let Some(n) = content_length {
        if body.len() < n {
            return Err(format!("body cut short: {} of {n} bytes", body.len()));
        }
        body = &body[..n];
    }
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_admin_address_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = http("GET", &format!("127.0.0.1:{port}"), "/health").unwrap_err();
        assert!(err.contains("connecting to"), "{err}");
        assert!(http("GET", "not an address", "/health").is_err());
    }

    #[test]
    fn parse_response_honours_content_length() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef";
        assert_eq!(parse_response(raw).unwrap(), (200, b"abc".to_vec()));
        let raw = b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy";
        assert_eq!(parse_response(raw).unwrap(), (503, b"busy".to_vec()));
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        assert!(parse_response(cut).unwrap_err().contains("cut short"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-").is_err());
        assert!(parse_response(b"nonsense\r\n\r\n").is_err());
    }
}
