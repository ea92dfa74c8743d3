//! The admin door (issue 21, 1 and 7) against a real `iris serve`: the
//! operator token written at the first start, refused requests without it,
//! `iris admin …` finding it without flags, an exposed listener without
//! auth refused, and 1,000 idle admin connections delaying nobody.
//!
//! Each was red before the door: every route answered anyone, the CLI sent
//! no credential (and needed none), a non-loopback `--admin` started, and
//! 64 idle connections made `/health` answer 503.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tests::{iris_bin, unique_temp_path, Server};

/// A raw request without credentials: the status code.
fn anonymous(admin: &str, method: &str, path: &str) -> u16 {
    engine::admin_http::AdminClient::new(admin, None)
        .call(method, path)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        .0
}

fn iris_in(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(iris_bin());
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    cmd.env_remove(engine::admin_auth::TOKEN_FILE_ENV);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run iris admin")
}

#[test]
fn the_admin_api_takes_orders_only_with_the_operator_token() {
    // Out of the box: data in DIR/iris-data, the CLI run from DIR.
    let home = unique_temp_path("admin-home");
    std::fs::create_dir_all(&home).unwrap();
    let data = home.join("iris-data");
    let admin = tests::free_loopback_addr();
    let mut server = Server::start_in(&data, &["--cores", "1", "--admin", &admin]);
    let token_file = data.join(engine::admin_auth::TOKEN_FILE_NAME);
    let mode = std::fs::metadata(&token_file)
        .expect("the node wrote DATA/admin.token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "owner-only");

    // Without the token: health and metrics, nothing else.
    assert_eq!(anonymous(&admin, "GET", "/health"), 200);
    assert_eq!(anonymous(&admin, "GET", "/metrics"), 200);
    for (method, path) in [
        ("POST", "/replication/promote"),
        ("POST", "/replication/promote?force=1"),
        ("POST", "/reload"),
        ("GET", "/replication/stats"),
        ("GET", "/slots/export?first=0&last=16383"),
        ("POST", "/slots/handoff?first=0&last=1&to=1&version=2"),
    ] {
        assert_eq!(anonymous(&admin, method, path), 401, "{method} {path}");
    }

    // The CLI finds ./iris-data/admin.token by itself.
    let out = iris_in(&home, &["admin", "stats", "--admin", &admin], &[]);
    assert!(
        out.status.success(),
        "iris admin stats from the data's parent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"shards\""));
    // Elsewhere it needs the file named, by flag or environment.
    let elsewhere = unique_temp_path("admin-elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let out = iris_in(&elsewhere, &["admin", "stats", "--admin", &admin], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    let path = token_file.to_str().unwrap();
    let out = iris_in(
        &elsewhere,
        &[
            "admin",
            "stats",
            "--admin",
            &admin,
            "--admin-token-file",
            path,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = iris_in(
        &elsewhere,
        &["admin", "stats", "--admin", &admin],
        &[(engine::admin_auth::TOKEN_FILE_ENV, path)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same token after a restart: the file is read, not replaced.
    let before = std::fs::read_to_string(&token_file).unwrap();
    server.terminate();
    server.restart();
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), before);
    let _ = std::fs::remove_dir_all(&home);
    let _ = std::fs::remove_dir_all(&elsewhere);
}

#[test]
fn an_exposed_admin_listener_without_operator_auth_refuses_to_start() {
    let (status, stderr) =
        tests::serve_must_fail(&["--admin", "0.0.0.0:0", "--admin-auth", "none"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("without operator auth"), "{stderr}");
}

#[test]
fn a_thousand_idle_admin_connections_delay_nobody() {
    let admin = tests::free_loopback_addr();
    let server = Server::start(&["--cores", "1", "--admin", &admin]);
    let client = tests::admin_of(&admin, server.data_dir());
    // Wait for the control thread.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.call("GET", "/health").is_err() {
        assert!(Instant::now() < deadline, "admin never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&admin).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = client.call("GET", "/health").unwrap();
    assert_eq!(status, 200, "/health behind 1,000 idle connections: {body}");
    // A promotion is answered too (409: already primary), not 503.
    let (status, body) = client.call("POST", "/replication/promote").unwrap();
    assert_eq!(status, 409, "{body}");
    // The idle ones are dropped after the request deadline.
    let mut first = idle.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(first.read(&mut buf).unwrap_or(0), 0, "closed by the server");
}
