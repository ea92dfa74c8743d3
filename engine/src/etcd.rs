//! A small etcd v3 client over etcd's own JSON gateway (`POST /v3/...`, part
//! of every etcd since 3.3), on the control thread's tokio runtime.
//!
//! Why not the `etcd-client` crate: its build script compiles etcd's
//! `.proto` files and needs `protoc` installed, so a fresh checkout would
//! not build with the README's commands (docs/DECISIONS.md 18). The gateway
//! speaks the same API (leases, transactions, watches) as JSON, and hyper
//! carries it.
//!
//! Every call is bounded: a deadline per request and a cap on the bytes of
//! an answer. Errors say whose fault they are: etcd unreachable or slow
//! ([`EtcdError::Unreachable`], [`EtcdError::Timeout`]) or an answer we
//! cannot read ([`EtcdError::Malformed`], [`EtcdError::Status`]).

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use serde_json::{json, Value};
use std::time::Duration;

/// Bytes of one answer from etcd (a range of one key, a txn, a lease call).
pub const ANSWER_BYTES_MAX: usize = 1 << 20;
/// Bytes of one watch event buffered before it is parsed.
pub const WATCH_LINE_BYTES_MAX: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {addr} unreachable: {why}")]
    Unreachable { addr: String, why: String },
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
#[derive(Debug, Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    timeout: Duration,
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

/// `http://HOST:PORT` (or `HOST:PORT`) → `HOST:PORT`.
fn authority(endpoint: &str) -> Result<String, String> {
    let rest = endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    if endpoint.starts_with("https://") {
        return Err(format!(
            "etcd endpoint {endpoint}: https is not supported yet; use http on a trusted network"
        ));
    }
    if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
        return Err(format!(
            "etcd endpoint {endpoint:?} is not http://HOST:PORT"
        ));
    }
    Ok(rest.to_string())
}

impl Etcd {
    /// `endpoints`: comma-separated `http://HOST:PORT`.
    pub fn new(endpoints: &str, timeout: Duration) -> Result<Etcd, String> {
        let endpoints = endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(authority)
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err("no etcd endpoint given".into());
        }
        Ok(Etcd { endpoints, timeout })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn post(&self, path: &'static str, body: Value) -> Result<Value, EtcdError> {
        let mut last = None;
        for addr in &self.endpoints {
            let call = post_once(addr, path, &body);
            match tokio::time::timeout(self.timeout, call).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e @ EtcdError::Unreachable { .. })) => last = Some(e),
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
        let connect = request(addr, P, &body);
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

async fn request(
    addr: &str,
    path: &'static str,
    body: &Value,
) -> Result<hyper::Response<Body>, EtcdError> {
    let unreachable = |why: String| EtcdError::Unreachable {
        addr: addr.to_string(),
        why,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    // The connection is driven beside the request; it ends with the response.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| unreachable(e.to_string()))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
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

async fn post_once(addr: &str, path: &'static str, body: &Value) -> Result<Value, EtcdError> {
    let response = request(addr, path, body).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_port() {
        let e = Etcd::new(
            "http://127.0.0.1:2379, 10.0.0.2:2379",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(e.endpoints(), ["127.0.0.1:2379", "10.0.0.2:2379"]);
        assert!(Etcd::new("https://x:1", Duration::from_secs(1)).is_err());
        assert!(Etcd::new("http://x", Duration::from_secs(1)).is_err());
        assert!(Etcd::new("", Duration::from_secs(1)).is_err());
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
