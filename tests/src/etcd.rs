//! A real etcd for the failover tests: Debian's `etcd-server`, installed
//! with apt-get if missing, started on free loopback ports with a fresh
//! data directory and the fast election timing the tests use
//! (`--heartbeat-interval 100 --election-timeout 500`), stopped on drop.

use crate::{free_loopback_addr, unique_temp_path};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to answer its health check.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Etcd {
    child: Child,
    /// `http://127.0.0.1:PORT` (`https://` from `start_tls`), for `--etcd`.
    pub url: String,
    /// A plain-HTTP client address (`HOST:PORT`) for the harness's own
    /// checks (`get`, the health check), also with `start_tls`.
    pub client: String,
    pub dir: PathBuf,
}

/// What `Etcd::start_tls` made: `iris certs` output in `dir` (`ca.pem`;
/// `etcd.pem`/`etcd.key` for etcd, naming 127.0.0.1 and localhost;
/// `node.pem`/`node.key`, a client certificate of the same CA).
pub struct EtcdCerts {
    pub dir: PathBuf,
}

impl EtcdCerts {
    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian's etcd-server (root, as on the test machines) if absent.
pub fn ensure_installed() {
    crate::apt::ensure_installed("etcd-server", installed);
}

/// Starts a one-member etcd serving `client` (HOST:PORT) with its data and
/// log in `dir`, the tests' election timing; waits until it is healthy.
pub fn spawn(client: &str, dir: &std::path::Path) -> Child {
    let url = format!("http://{client}");
    spawn_with(client, dir, &url, &url, &[])
}

/// `spawn` with its own client URLs and more flags; `client` is a plain
/// address among the listened URLs, for the health check.
fn spawn_with(
    client: &str,
    dir: &std::path::Path,
    listen: &str,
    advertise: &str,
    extra: &[String],
) -> Child {
    let peer = free_loopback_addr();
    let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
    let mut child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--listen-client-urls",
            listen,
            "--advertise-client-urls",
            advertise,
            "--listen-peer-urls",
            &format!("http://{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://{peer}"),
            "--initial-cluster",
            &format!("t=http://{peer}"),
            "--heartbeat-interval",
            "100",
            "--election-timeout",
            "500",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start etcd");
    let deadline = Instant::now() + READY_TIMEOUT;
    let healthy = || {
        engine::admin_cmd::http("GET", client, "/health")
            .is_ok_and(|(status, body)| status == 200 && body.contains("true"))
    };
    while !healthy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if !healthy() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("etcd did not become healthy; log in {}", dir.display());
    }
    child
}

impl Etcd {
    pub fn start() -> Etcd {
        ensure_installed();
        let dir = unique_temp_path("etcd");
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let client = free_loopback_addr();
        Etcd {
            child: spawn(&client, &dir),
            url: format!("http://{client}"),
            client,
            dir,
        }
    }

    /// etcd serving its clients over https only to those with a client
    /// certificate of the test CA (`--client-cert-auth`), as a production
    /// etcd would; `url` is that https endpoint. The harness keeps a second,
    /// plain listener (`client`) for its own health check and reads: the
    /// nodes under test are given only the https one.
    pub fn start_tls() -> (Etcd, EtcdCerts) {
        ensure_installed();
        let dir = unique_temp_path("etcd-tls");
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let certs = EtcdCerts {
            dir: dir.join("certs"),
        };
        let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
        // etcd's certificate must allow client use too: etcd's own JSON
        // gateway presents it to etcd's gRPC side under --client-cert-auth
        // (a server-only certificate gets every gateway call "connection
        // closed", HTTP 503). `iris certs` node certificates allow both.
        let names = ["etcd".to_string(), "node".to_string()];
        engine::dev_cmd::certs(&certs.dir, &hosts, &names).expect("iris certs");
        let (tls, plain) = (free_loopback_addr(), free_loopback_addr());
        let extra: Vec<String> = [
            ("--cert-file", "etcd.pem"),
            ("--key-file", "etcd.key"),
            ("--trusted-ca-file", "ca.pem"),
        ]
        .iter()
        .flat_map(|(flag, file)| [flag.to_string(), certs.file(file)])
        .chain(["--client-cert-auth".to_string()])
        .collect();
        let child = spawn_with(
            &plain,
            &dir,
            &format!("https://{tls},http://{plain}"),
            &format!("https://{tls}"),
            &extra,
        );
        let etcd = Etcd {
            child,
            url: format!("https://{tls}"),
            client: plain,
            dir,
        };
        (etcd, certs)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The value of `key`, read through etcd's JSON gateway (None: absent).
    pub fn get(&self, key: &str) -> Option<String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({ "key": b64.encode(key) }).to_string();
        let (status, text) = engine::admin_http::AdminClient::new(self.client.as_str(), None)
            .call_with_body("POST", "/v3/kv/range", body.as_bytes())
            .unwrap_or_else(|e| panic!("etcd range {key}: {e}"));
        assert_eq!(status, 200, "etcd range {key}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("etcd JSON");
        let value = v["kvs"].get(0)?["value"].as_str()?;
        let bytes = b64.decode(value).expect("etcd value in base64");
        Some(String::from_utf8(bytes).expect("utf-8 value"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
