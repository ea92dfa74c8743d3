//! A small etcd v3 client over etcd's own JSON gateway (`POST /v3/...`, part
//! of every etcd since 3.3), on the control thread's tokio runtime.
//!
//! Why not the `etcd-client` crate: its build script compiles etcd's
//! `.proto` files and needs `protoc` installed, so a fresh checkout would
//! not build with the README's commands (docs/DECISIONS.md 18). The gateway
//! speaks the same API (leases, transactions, watches) as JSON, and hyper
//! carries it.
//!
//! Endpoints are `http://` or, with [`EtcdTls`] (a CA file, and a client
//! certificate when etcd runs with `--client-cert-auth`), `https://`: TLS
//! 1.2 or 1.3 through rustls under the tokio stream, the server's
//! certificate checked against that CA and the endpoint's host name.
//!
//! Every call is bounded: a deadline per request and a cap on the bytes of
//! an answer. Errors say whose fault they are: etcd unreachable or slow
//! ([`EtcdError::Unreachable`], [`EtcdError::Timeout`]), a TLS handshake
//! that failed ([`EtcdError::Tls`]: a certificate or CA that does not fit)
//! or an answer we cannot read ([`EtcdError::Malformed`], [`EtcdError::Status`]).

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Bytes of one answer from etcd (a range of one key, a txn, a lease call).
pub const ANSWER_BYTES_MAX: usize = 1 << 20;
/// Bytes of one watch event buffered before it is parsed.
pub const WATCH_LINE_BYTES_MAX: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {addr} unreachable: {why}")]
    Unreachable { addr: String, why: String },
    #[error("TLS with etcd at {addr} failed: {why}")]
    Tls { addr: String, why: String },
    #[error("etcd did not answer {path} within {ms} ms")]
    Timeout { path: &'static str, ms: u64 },
    #[error("etcd answered {path} with HTTP {status}: {body}")]
    Status {
        path: &'static str,
        status: u16,
        body: String,
    },
    #[error("etcd's answer to {path} is malformed: {why}")]
    Malformed { path: &'static str, why: String },
}

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    /// The revision that created the key (it only grows, cluster-wide).
    pub create_revision: u64,
    pub mod_revision: u64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Kv),
    Delete { key: String },
}

/// The endpoints of one etcd cluster; calls go to the first that answers.
#[derive(Clone)]
pub struct Etcd {
    /// `HOST:PORT` of each endpoint.
    endpoints: Vec<String>,
    timeout: Duration,
    /// Set when the endpoints are https.
    tls: Option<tokio_rustls::TlsConnector>,
}

/// How this node speaks TLS to etcd: the CA that signed etcd's server
/// certificate, and this node's client certificate and key (for etcd's
/// `--client-cert-auth`; optional otherwise).
pub struct EtcdTls {
    config: Arc<rustls::ClientConfig>,
}

impl EtcdTls {
    pub fn load(ca: &Path, cert_key: Option<(&Path, &Path)>) -> Result<EtcdTls, String> {
        let roots = crate::tls::load_roots("etcd CA", ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match cert_key {
            Some((cert, key)) => builder
                .with_client_auth_cert(crate::tls::load_certs(cert)?, crate::tls::load_key(key)?)
                .map_err(|e| format!("etcd client certificate and key do not go together: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        Ok(EtcdTls {
            config: Arc::new(config),
        })
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(path: &'static str, v: &Value) -> Result<String, EtcdError> {
    let Some(s) = v.as_str() else {
        return Ok(String::new()); // proto3 JSON leaves empty bytes out
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| EtcdError::Malformed {
            path,
            why: format!("bad base64: {e}"),
        })?;
    String::from_utf8(bytes).map_err(|_| EtcdError::Malformed {
        path,
        why: "a key or value is not UTF-8".into(),
    })
}

/// proto3 JSON writes 64-bit integers as strings and leaves zeros out.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_of(path: &'static str, v: &Value) -> Result<Kv, EtcdError> {
    Ok(Kv {
        key: unb64(path, &v["key"])?,
        value: unb64(path, &v["value"])?,
        create_revision: int(&v["create_revision"]).max(0) as u64,
        mod_revision: int(&v["mod_revision"]).max(0) as u64,
        lease: int(&v["lease"]),
    })
}

/// `http://HOST:PORT` (or `HOST:PORT`) or `https://HOST:PORT` → `HOST:PORT`
/// and whether it is https.
fn authority(endpoint: &str) -> Result<(String, bool), String> {
    let (rest, https) = match endpoint.strip_prefix("https://") {
        Some(rest) => (rest, true),
        None => (endpoint.strip_prefix("http://").unwrap_or(endpoint), false),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
        return Err(format!(
            "etcd endpoint {endpoint:?} is not http://HOST:PORT or https://HOST:PORT"
        ));
    }
    Ok((rest.to_string(), https))
}

impl Etcd {
    /// `endpoints`: comma-separated `http://HOST:PORT`, or all
    /// `https://HOST:PORT` with `tls`.
    pub fn new(endpoints: &str, timeout: Duration, tls: Option<EtcdTls>) -> Result<Etcd, String> {
        let parsed = endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(authority)
            .collect::<Result<Vec<_>, _>>()?;
        if parsed.is_empty() {
            return Err("no etcd endpoint given".into());
        }
        let https = parsed.iter().filter(|(_, h)| *h).count();
        if https != 0 && https != parsed.len() {
            return Err(format!(
                "etcd endpoints {endpoints:?}: all http:// or all https://, not both"
            ));
        }
        let tls = match (https != 0, tls) {
            (true, Some(tls)) => Some(tokio_rustls::TlsConnector::from(tls.config)),
            (true, None) => {
                return Err(format!(
                    "etcd endpoints {endpoints:?} are https: give the CA that signed etcd's certificate (etcd_ca, --etcd-ca)"
                ))
            }
            (false, Some(_)) => {
                return Err(format!(
                    "an etcd CA is given but the endpoints {endpoints:?} are http://: use https:// endpoints"
                ))
            }
            (false, None) => None,
        };
        Ok(Etcd {
            endpoints: parsed.into_iter().map(|(a, _)| a).collect(),
            timeout,
            tls,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn post(&self, path: &'static str, body: Value) -> Result<Value, EtcdError> {
        let mut last = None;
        for addr in &self.endpoints {
            let call = self.post_once(addr, path, &body);
            match tokio::time::timeout(self.timeout, call).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e @ (EtcdError::Unreachable { .. } | EtcdError::Tls { .. }))) => {
                    last = Some(e)
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    last = Some(EtcdError::Timeout {
                        path,
                        ms: self.timeout.as_millis() as u64,
                    })
                }
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// A new lease of `ttl` seconds (etcd's unit): its ID and granted TTL.
    pub async fn grant(&self, ttl_secs: u64) -> Result<(i64, u64), EtcdError> {
        const P: &str = "/v3/lease/grant";
        let v = self.post(P, json!({ "TTL": ttl_secs })).await?;
        let id = int(&v["ID"]);
        if id == 0 {
            return Err(EtcdError::Malformed {
                path: P,
                why: format!("no lease ID in {v}"),
            });
        }
        Ok((id, int(&v["TTL"]).max(0) as u64))
    }

    /// Renews a lease: the TTL left in seconds, 0 when the lease is gone.
    pub async fn keepalive(&self, lease: i64) -> Result<u64, EtcdError> {
        const P: &str = "/v3/lease/keepalive";
        let v = self.post(P, json!({ "ID": lease.to_string() })).await?;
        // The gateway streams: one {"result": ...} per request sent.
        let r = v.get("result").unwrap_or(&v);
        if let Some(e) = v.get("error") {
            return Err(EtcdError::Malformed {
                path: P,
                why: e.to_string(),
            });
        }
        Ok(int(&r["TTL"]).max(0) as u64)
    }

    /// Ends a lease now (its keys are deleted). A lease already gone is fine.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        const P: &str = "/v3/lease/revoke";
        match self.post(P, json!({ "ID": lease.to_string() })).await {
            Ok(_) | Err(EtcdError::Status { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The key, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        const P: &str = "/v3/kv/range";
        let v = self.post(P, json!({ "key": b64(key) })).await?;
        match v["kvs"].as_array().and_then(|a| a.first()) {
            Some(kv) => Ok(Some(kv_of(P, kv)?)),
            None => Ok(None),
        }
    }

    /// Every key under `prefix`, at most `limit`.
    pub async fn get_prefix(&self, prefix: &str, limit: u64) -> Result<Vec<Kv>, EtcdError> {
        const P: &str = "/v3/kv/range";
        let body =
            json!({ "key": b64(prefix), "range_end": b64(&prefix_end(prefix)), "limit": limit });
        let v = self.post(P, body).await?;
        v["kvs"]
            .as_array()
            .map(|a| a.iter().map(|kv| kv_of(P, kv)).collect())
            .unwrap_or(Ok(Vec::new()))
    }

    /// Creates `key` = `value` under `lease` if no such key exists, and puts
    /// `also` (without lease) in the same transaction. Ok(Ok(revision)) when
    /// created (the key's create_revision), Ok(Err(holder)) otherwise.
    pub async fn create(
        &self,
        key: &str,
        value: &str,
        lease: i64,
        also: Option<(&str, &str)>,
    ) -> Result<Result<u64, Option<Kv>>, EtcdError> {
        const P: &str = "/v3/kv/txn";
        let mut success = vec![json!({ "request_put": {
            "key": b64(key), "value": b64(value), "lease": lease.to_string() } })];
        if let Some((k, v)) = also {
            success.push(json!({ "request_put": { "key": b64(k), "value": b64(v) } }));
        }
        let body = json!({
            "compare": [{ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": success,
            "failure": [{ "request_range": { "key": b64(key) } }],
        });
        let v = self.post(P, body).await?;
        if v["succeeded"].as_bool() == Some(true) {
            let rev = int(&v["header"]["revision"]).max(0) as u64;
            if rev == 0 {
                return Err(EtcdError::Malformed {
                    path: P,
                    why: "a successful txn without a revision".into(),
                });
            }
            return Ok(Ok(rev));
        }
        let holder = v["responses"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(|r| r["response_range"]["kvs"].as_array())
            .and_then(|kvs| kvs.first())
            .map(|kv| kv_of(P, kv))
            .transpose()?;
        Ok(Err(holder))
    }

    /// Puts `key` = `value` only while `guard` still has `create_revision`
    /// (this node's leadership): false when it does not.
    pub async fn put_guarded(
        &self,
        guard: &str,
        create_revision: u64,
        key: &str,
        value: &str,
    ) -> Result<bool, EtcdError> {
        const P: &str = "/v3/kv/txn";
        let body = json!({
            "compare": [{ "key": b64(guard), "target": "CREATE", "result": "EQUAL",
                          "create_revision": create_revision.to_string() }],
            "success": [{ "request_put": { "key": b64(key), "value": b64(value) } }],
        });
        let v = self.post(P, body).await?;
        Ok(v["succeeded"].as_bool() == Some(true))
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.post("/v3/kv/deleterange", json!({ "key": b64(key) }))
            .await
            .map(|_| ())
    }

    /// Watches every key under `prefix` from now on, calling `on` for each
    /// event, until the stream ends or fails (the caller watches again).
    /// Only the connection is bounded by the timeout: a watch is long-lived.
    pub async fn watch_prefix(
        &self,
        prefix: &str,
        mut on: impl FnMut(WatchEvent),
    ) -> Result<(), EtcdError> {
        const P: &str = "/v3/watch";
        let body = json!({ "create_request": {
            "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) } });
        let addr = &self.endpoints[0];
        let connect = self.request(addr, P, &body);
        let mut response = match tokio::time::timeout(self.timeout, connect).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(EtcdError::Timeout {
                    path: P,
                    ms: self.timeout.as_millis() as u64,
                })
            }
        };
        let mut line = Vec::new();
        while let Some(frame) = response.frame().await {
            let frame = frame.map_err(|e| EtcdError::Unreachable {
                addr: addr.clone(),
                why: e.to_string(),
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for &b in data.iter() {
                if b != b'\n' {
                    if line.len() >= WATCH_LINE_BYTES_MAX {
                        return Err(EtcdError::Malformed {
                            path: P,
                            why: format!("a watch event over {WATCH_LINE_BYTES_MAX} bytes"),
                        });
                    }
                    line.push(b);
                    continue;
                }
                let text = std::mem::take(&mut line);
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: Value = serde_json::from_slice(&text).map_err(|e| EtcdError::Malformed {
                    path: P,
                    why: e.to_string(),
                })?;
                if let Some(e) = v.get("error") {
                    return Err(EtcdError::Malformed {
                        path: P,
                        why: e.to_string(),
                    });
                }
                for ev in v["result"]["events"].as_array().into_iter().flatten() {
                    let kv = kv_of(P, &ev["kv"])?;
                    on(match ev["type"].as_str() {
                        Some("DELETE") => WatchEvent::Delete { key: kv.key },
                        _ => WatchEvent::Put(kv),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The end of a prefix range: the prefix with its last byte plus one.
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).expect("ASCII");
        }
    }
    "\0".into()
}

type Body = hyper::body::Incoming;

impl Etcd {
    /// One POST on a new connection (TLS when the endpoints are https); the
    /// response once its head arrived with status 200.
    async fn request(
        &self,
        addr: &str,
        path: &'static str,
        body: &Value,
    ) -> Result<hyper::Response<Body>, EtcdError> {
        let stream =
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| EtcdError::Unreachable {
                    addr: addr.to_string(),
                    why: e.to_string(),
                })?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return send(stream, addr, path, body).await;
        };
        let host = net::host_of(addr);
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
            EtcdError::Tls {
                addr: addr.to_string(),
                why: format!("{host:?} is not a server name: {e}"),
            }
        })?;
        let stream = tls
            .connect(name, stream)
            .await
            .map_err(|e| EtcdError::Tls {
                addr: addr.to_string(),
                why: e.to_string(),
            })?;
        send(stream, addr, path, body).await
    }

    async fn post_once(
        &self,
        addr: &str,
        path: &'static str,
        body: &Value,
    ) -> Result<Value, EtcdError> {
        let response = self.request(addr, path, body).await?;
        let bytes = Limited::new(response.into_body(), ANSWER_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| EtcdError::Malformed {
                path,
                why: format!("answer unreadable or over {ANSWER_BYTES_MAX} bytes: {e}"),
            })?
            .to_bytes();
        // A streamed answer (keepalive) is one JSON object per line: take the first.
        let first = bytes
            .split(|&b| b == b'\n')
            .find(|l| !l.iter().all(u8::is_ascii_whitespace))
            .unwrap_or(&[]);
        serde_json::from_slice(first).map_err(|e| EtcdError::Malformed {
            path,
            why: format!("{e}: {}", String::from_utf8_lossy(first)),
        })
    }
}

/// An error and its causes, outermost first: "a: b: c".
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The POST over an open connection, plain or TLS.
async fn send<S>(
    stream: S,
    addr: &str,
    path: &'static str,
    body: &Value,
) -> Result<hyper::Response<Body>, EtcdError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let unreachable = |why: String| EtcdError::Unreachable {
        addr: addr.to_string(),
        why,
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(with_causes(&e)))?;
    // The connection is driven beside the request; it ends with the response.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| unreachable(e.to_string()))?;
    // hyper's own message is terse ("connection error"); its causes say
    // what happened (a TLS alert from etcd, a reset).
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(with_causes(&e)))?;
    let status = response.status().as_u16();
    if status != 200 {
        let bytes = Limited::new(response.into_body(), 4096)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(EtcdError::Status {
            path,
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_or_https_host_port() {
        let t = Duration::from_secs(1);
        let e = Etcd::new("http://127.0.0.1:2379, 10.0.0.2:2379", t, None).unwrap();
        assert_eq!(e.endpoints(), ["127.0.0.1:2379", "10.0.0.2:2379"]);
        let https = Etcd::new("https://x:1", t, None).err().expect("refused");
        assert!(https.contains("--etcd-ca"), "{https}");
        assert!(Etcd::new("http://x", t, None).is_err());
        assert!(Etcd::new("", t, None).is_err());
        let dir = std::env::temp_dir().join(format!("iris-etcd-tls-{}", std::process::id()));
        crate::dev_cmd::certs(&dir, &["localhost".into()], &["n".into()]).unwrap();
        let tls = || EtcdTls::load(&dir.join("ca.pem"), None).unwrap();
        let e = Etcd::new("https://localhost:2379,https://[::1]:2379", t, Some(tls())).unwrap();
        assert_eq!(e.endpoints(), ["localhost:2379", "[::1]:2379"]);
        let mixed = Etcd::new("https://x:1,http://y:2", t, Some(tls()))
            .err()
            .expect("refused");
        assert!(mixed.contains("not both"), "{mixed}");
        let plain = Etcd::new("http://x:1", t, Some(tls()))
            .err()
            .expect("refused");
        assert!(plain.contains("use https://"), "{plain}");
        let key = (dir.join("n.pem"), dir.join("n.key"));
        assert!(EtcdTls::load(&dir.join("ca.pem"), Some((&key.0, &key.1))).is_ok());
        let other = (dir.join("n.pem"), dir.join("ca.pem"));
        assert!(EtcdTls::load(&dir.join("ca.pem"), Some((&other.0, &other.1))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proto3_json_integers_and_prefix_ends() {
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(7)), 7);
        assert_eq!(int(&Value::Null), 0);
        assert_eq!(prefix_end("iris/p0/"), "iris/p00");
        let kv = kv_of(
            "/t",
            &json!({"key": b64("k"), "value": b64("v"), "create_revision": "9", "lease": "5"}),
        )
        .unwrap();
        assert_eq!(
            (
                kv.key.as_str(),
                kv.value.as_str(),
                kv.create_revision,
                kv.lease
            ),
            ("k", "v", 9, 5)
        );
        assert!(kv_of("/t", &json!({"key": "!!"})).is_err());
    }
}
