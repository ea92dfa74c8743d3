//! TLS and JWT logins end to end: real `iris` processes, real rustls clients
//! on loopback, keys and certificates made by `iris keygen` and `iris certs`.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use net::{Client, ClientError, TlsSettings};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::*;

const TIMEOUT: Duration = Duration::from_secs(10);

fn iris(args: &[&str]) -> String {
    let out = Command::new(iris_bin())
        .args(args)
        .output()
        .expect("run iris");
    assert!(
        out.status.success(),
        "iris {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn temp_dir(tag: &str) -> PathBuf {
    unique_temp_path(&format!("sec-{tag}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `iris token` for `user` with `key` (its stem is the kid).
fn token(key: &Path, user: &str) -> String {
    iris(&["token", "--key", s(key), "--user", user, "--ttl", "600"])
        .trim()
        .to_string()
}

fn now() -> u64 {
    engine::auth::now_s()
}

/// A token with chosen claims and header, signed with an Ed25519 private key.
fn signed(key: &Path, kid: Option<&str>, claims: serde_json::Value) -> String {
    let pem = std::fs::read(key).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap()
}

struct Node {
    server: Server,
    admin: String,
    tls_addr: String,
    keys: PathBuf,
    certs: PathBuf,
}

fn start_node(tag: &str) -> Node {
    start_node_with(tag, &[])
}

fn start_node_with(tag: &str, extra: &[&str]) -> Node {
    let keys = temp_dir(&format!("{tag}-keys"));
    let certs = temp_dir(&format!("{tag}-certs"));
    iris(&["keygen", "--out", s(&keys)]);
    iris(&["certs", "--out", s(&certs)]);
    let cert = certs.join("server.pem");
    let key = certs.join("server.key");
    let mut args = vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--auth",
        "jwt",
        "--jwt-keys",
        s(&keys),
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    let tls_addr = server.stdout_line("iris tls listening on ");
    let admin = server.stdout_line("iris admin listening on ");
    Node {
        server,
        admin,
        tls_addr,
        keys,
        certs,
    }
}

impl Node {
    fn tls(&self) -> TlsSettings {
        TlsSettings::from_ca_file(&self.certs.join("ca.pem"), "127.0.0.1").unwrap()
    }

    fn hello_tls(&self, user: &str, token: &str) -> Result<Client, ClientError> {
        let tls = self.tls();
        Client::connect_with(&self.tls_addr, Some(&tls), user, token.as_bytes(), TIMEOUT)
            .map(|(c, _)| c)
    }

    fn metric(&self, line_prefix: &str) -> u64 {
        let (status, text) =
            engine::admin_cmd::http("GET", &self.admin, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn failures(&self, reason: &str) -> u64 {
        self.metric(&format!("iris_auth_failures_total{{reason=\"{reason}\"}} "))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.keys);
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

fn expect_auth_refused(result: Result<Client, ClientError>, label: &str) {
    match result {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, 2, "{reason}");
            assert!(
                reason.contains(label),
                "reason {reason:?} should name {label}"
            );
        }
        Err(other) => panic!("expected ERROR 2 ({label}), got {other:?}"),
        Ok(_) => panic!("expected ERROR 2 ({label}), the login was accepted"),
    }
}

#[test]
fn a_valid_token_sends_and_receives_over_tls_and_over_plain_tcp() {
    let node = start_node("valid");
    let key = node.keys.join("iris.key");
    let mut alice = node
        .hello_tls("alice", &token(&key, "alice"))
        .expect("alice over TLS");
    let mut bob = node
        .hello_tls("bob", &token(&key, "bob"))
        .expect("bob over TLS");
    round_trip(&mut alice, "alice", &mut bob, "bob");
    // A message big enough to span several TLS records, both ways.
    let body = vec![0x5a; 60_000];
    send_stored(&mut alice, "bob", &body);
    let got = collect_and_ack(&mut bob, 1);
    assert_eq!(got[0].body, body);
    // The plain listener (given with --listen) takes the same tokens.
    let (mut carol, _) = Client::connect(
        node.server.addr(),
        "carol",
        token(&key, "carol").as_bytes(),
        TIMEOUT,
    )
    .expect("carol over TCP");
    round_trip(&mut carol, "carol", &mut bob, "bob");
    assert_eq!(node.metric("iris_auth_accepted_total "), 3);
}

#[test]
fn every_bad_token_gets_error_2_a_close_and_its_counter() {
    let node = start_node("bad");
    let key = node.keys.join("iris.key");
    let public = std::fs::read(node.keys.join("iris.pem")).unwrap();
    let other = temp_dir("other-key");
    iris(&["keygen", "--out", s(&other)]); // same kid "iris", another key
    let t = now();
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(serde_json::json!({"alg": "none", "kid": "iris"})),
        b64(serde_json::json!({"sub": "alice", "exp": t + 600}))
    );
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("iris".into());
    let hmac_with_public_key = jsonwebtoken::encode(
        &hs_header,
        &serde_json::json!({"sub": "alice", "exp": t + 600}),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("missing", String::new()),
        ("malformed", "not-a-jwt".into()),
        (
            "malformed",
            signed(&key, Some("iris"), serde_json::json!({"sub": "alice"})),
        ),
        ("forged", token(&other.join("iris.key"), "alice")),
        (
            "expired",
            signed(
                &key,
                Some("iris"),
                serde_json::json!({"sub": "alice", "exp": t - 3600}),
            ),
        ),
        (
            "not_yet_valid",
            signed(
                &key,
                Some("iris"),
                serde_json::json!({"sub": "alice", "exp": t + 7200, "nbf": t + 3600}),
            ),
        ),
        ("wrong_sub", token(&key, "mallory")),
        (
            "unknown_kid",
            signed(
                &key,
                Some("nope"),
                serde_json::json!({"sub": "alice", "exp": t + 600}),
            ),
        ),
        ("wrong_alg", alg_none),
        ("wrong_alg", hmac_with_public_key),
    ];
    for (label, token) in &cases {
        expect_auth_refused(node.hello_tls("alice", token), label);
    }
    for label in [
        "missing",
        "forged",
        "expired",
        "not_yet_valid",
        "wrong_sub",
        "unknown_kid",
    ] {
        assert_eq!(node.failures(label), 1, "{label}");
    }
    assert_eq!(node.failures("malformed"), 2);
    assert_eq!(node.failures("wrong_alg"), 2);
    assert_eq!(node.metric("iris_auth_accepted_total "), 0);
    // Within the leeway (60 s) an expired token still passes; a good token
    // with no kid is taken when only one key is configured.
    node.hello_tls(
        "alice",
        &signed(
            &key,
            Some("iris"),
            serde_json::json!({"sub": "alice", "exp": t - 10}),
        ),
    )
    .expect("inside the leeway");
    node.hello_tls(
        "alice",
        &signed(
            &key,
            None,
            serde_json::json!({"sub": "alice", "exp": t + 60}),
        ),
    )
    .expect("no kid, one key");
    // The reason is logged, never the token.
    let log = node.server.log_tail_full();
    assert!(log.contains("reason=\"forged\""), "{log}");
    for (_, token) in &cases {
        if token.len() > 20 {
            assert!(!log.contains(token.as_str()), "a token reached the log");
        }
    }
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn a_cached_token_still_expires_and_still_checks_sub() {
    // No leeway, so the test need not wait a minute for an expiry.
    let node = start_node_with("cache", &["--jwt-leeway-secs", "0"]);
    let key = node.keys.join("iris.key");
    let t = signed(
        &key,
        Some("iris"),
        serde_json::json!({"sub": "alice", "exp": now() + 2}),
    );
    for _ in 0..10 {
        node.hello_tls("alice", &t).expect("a fresh token");
    }
    // Each of the 2 cores verifies once and then answers from its cache.
    let verified = node.metric("iris_auth_verified_total ");
    assert!(
        (1..=2).contains(&verified),
        "{verified} verifications for 10 logins"
    );
    expect_auth_refused(node.hello_tls("bob", &t), "wrong_sub");
    std::thread::sleep(Duration::from_millis(3100));
    for _ in 0..4 {
        expect_auth_refused(node.hello_tls("alice", &t), "expired");
    }
    assert_eq!(
        node.metric("iris_auth_verified_total "),
        verified,
        "expired from the cache"
    );
}

#[test]
fn keys_rotate_on_sighup_and_post_reload_and_a_bad_key_is_refused() {
    let node = start_node("rotate");
    let old_key = node.keys.join("iris.key");
    let staging = temp_dir("rotate-new");
    iris(&["keygen", "--out", s(&staging), "--kid", "next"]);
    let new_key = staging.join("next.key");
    expect_auth_refused(
        node.hello_tls("alice", &token(&new_key, "alice")),
        "unknown_kid",
    );
    // Rotation, step 1: add the new public key, SIGHUP: both accepted.
    std::fs::copy(staging.join("next.pem"), node.keys.join("next.pem")).unwrap();
    let pid = node.server.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let new_token = token(&new_key, "alice");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while node.hello_tls("alice", &new_token).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not load the new key"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let old_token = token(&old_key, "alice");
    node.hello_tls("alice", &old_token)
        .expect("old key still good during rotation");
    // Step 2: the old key goes (POST /reload); its tokens, cached or not, stop working.
    std::fs::remove_file(node.keys.join("iris.pem")).unwrap();
    let (status, body) = tests::admin_of(&node.admin, node.server.data_dir())
        .call("POST", "/reload")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    expect_auth_refused(node.hello_tls("alice", &old_token), "unknown_kid");
    node.hello_tls("alice", &new_token).expect("new key good");
    // A broken key file: reload refused, the loaded keys stay.
    std::fs::write(
        node.keys.join("broken.pem"),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let (status, body) = tests::admin_of(&node.admin, node.server.data_dir())
        .call("POST", "/reload")
        .unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("broken.pem"), "{body}");
    node.hello_tls("alice", &new_token)
        .expect("old set kept after a bad reload");
    let _ = std::fs::remove_dir_all(&staging);
}

#[test]
fn tls_refuses_untrusted_servers_and_survives_plain_bytes() {
    let node = start_node("trust");
    let key = node.keys.join("iris.key");
    // A client trusting another CA: the handshake fails, nothing is sent.
    let other = temp_dir("other-ca");
    iris(&["certs", "--out", s(&other)]);
    let wrong = TlsSettings::from_ca_file(&other.join("ca.pem"), "127.0.0.1").unwrap();
    match Client::connect_raw_with(&node.tls_addr, Some(&wrong), TIMEOUT) {
        Err(ClientError::Tls(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("expected a TLS failure, got {:?}", other.map(|_| ())),
    }
    // The right CA but the wrong name.
    let misnamed = TlsSettings::from_ca_file(&node.certs.join("ca.pem"), "iris.example").unwrap();
    assert!(matches!(
        Client::connect_raw_with(&node.tls_addr, Some(&misnamed), TIMEOUT),
        Err(ClientError::Tls(_))
    ));
    // Plain protocol bytes on the TLS port: closed, and the server goes on.
    let mut raw = connect_raw(&node.tls_addr);
    raw.write_raw(&raw::hello(1, b"alice", b"x")).unwrap();
    raw.flush().unwrap();
    expect_closed(&mut raw);
    node.hello_tls("alice", &token(&key, "alice"))
        .expect("server still serves TLS");
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn the_tls_certificate_reloads_without_dropping_connections() {
    let node = start_node("certs");
    let key = node.keys.join("iris.key");
    let mut alice = node.hello_tls("alice", &token(&key, "alice")).unwrap();
    let mut bob = node.hello_tls("bob", &token(&key, "bob")).unwrap();
    // A new CA and server pair replaces the files; SIGHUP.
    let fresh = temp_dir("fresh-certs");
    iris(&["certs", "--out", s(&fresh)]);
    for f in ["server.pem", "server.key"] {
        std::fs::copy(fresh.join(f), node.certs.join(f)).unwrap();
    }
    let (status, body) = tests::admin_of(&node.admin, node.server.data_dir())
        .call("POST", "/reload")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // Open connections go on; new ones see the new certificate.
    round_trip(&mut alice, "alice", &mut bob, "bob");
    let new_ca = TlsSettings::from_ca_file(&fresh.join("ca.pem"), "127.0.0.1").unwrap();
    Client::connect_with(
        &node.tls_addr,
        Some(&new_ca),
        "carol",
        token(&key, "carol").as_bytes(),
        TIMEOUT,
    )
    .expect("the new certificate is served");
    assert!(matches!(
        node.hello_tls("carol", &token(&key, "carol")),
        Err(ClientError::Tls(_))
    ));
    // A key that does not match the certificate: refused, the pair in use stays.
    std::fs::copy(node.certs.join("node.key"), node.certs.join("server.key")).unwrap();
    let (status, body) = tests::admin_of(&node.admin, node.server.data_dir())
        .call("POST", "/reload")
        .unwrap();
    assert_eq!(status, 500, "{body}");
    Client::connect_with(
        &node.tls_addr,
        Some(&new_ca),
        "dave",
        token(&key, "dave").as_bytes(),
        TIMEOUT,
    )
    .expect("the last good certificate stays");
    let _ = std::fs::remove_dir_all(&fresh);
}

#[test]
fn no_auth_on_a_non_loopback_listener_refuses_to_start_unless_insecure() {
    let (status, stderr) = serve_must_fail(&["--listen", "0.0.0.0:0"]);
    assert!(!status.success());
    assert!(
        stderr.contains("--insecure-no-auth") && stderr.contains("--auth jwt"),
        "{stderr}"
    );
    let (status, stderr) = serve_must_fail(&["--auth", "jwt"]);
    assert!(!status.success());
    assert!(stderr.contains("--jwt-keys"), "{stderr}");
    let (status, stderr) = serve_must_fail(&["--tls-listen", "127.0.0.1:0"]);
    assert!(!status.success());
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    // Accepted with the explicit flag, and /health says so.
    let server = Server::start(&[
        "--listen",
        "0.0.0.0:0",
        "--insecure-no-auth",
        "--admin",
        "127.0.0.1:0",
    ]);
    let admin = server.stdout_line("iris admin listening on ");
    let (status, body) = engine::admin_cmd::http("GET", &admin, "/health").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("insecure-no-auth"), "{body}");
    assert!(server.log_tail_full().contains("insecure-no-auth"));
}

#[test]
fn keygen_and_certs_never_overwrite() {
    let dir = temp_dir("overwrite");
    iris(&["keygen", "--out", s(&dir)]);
    let out = Command::new(iris_bin())
        .args(["keygen", "--out", s(&dir)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not overwritten"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("iris.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// After `--failed-logins-per-address-per-min` refused logins, the address's
/// next connections get ERROR 7 for the rest of the minute, good token or not.
#[test]
fn an_address_with_too_many_failed_logins_is_turned_away() {
    let node = start_node_with("failed", &["--failed-logins-per-address-per-min", "3"]);
    let key = node.keys.join("iris.key");
    let good = token(&key, "alice");
    node.hello_tls("alice", &good).expect("a good login first");
    for _ in 0..3 {
        expect_auth_refused(node.hello_tls("alice", "garbage"), "malformed");
    }
    // Plain TCP shows the ERROR 7; TLS connections are closed.
    match Client::connect(node.server.addr(), "alice", good.as_bytes(), TIMEOUT) {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, 7, "{reason}");
            assert!(reason.contains("failed logins"), "{reason}");
        }
        other => panic!("expected ERROR 7, got {:?}", other.map(|_| ())),
    }
    assert!(
        node.hello_tls("alice", &good).is_err(),
        "TLS from that address still served"
    );
}
