//! Automatic failover through an etcd that speaks https only and asks every
//! client for a certificate (`etcd --client-cert-auth`), as a production
//! etcd does: the pair's nodes and the edge reach it with `--etcd-ca`,
//! `--etcd-cert` and `--etcd-key`, a primary is elected, and after a kill -9
//! the replica takes over. A process without a client certificate, or one
//! that trusts another CA, gets nothing from etcd and says why in its log.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};
use tests::dev_cluster::DevCluster;
use tests::*;

/// Waits until `log` holds a line with every one of `words`; panics with
/// the log after 20 s.
fn wait_for_log_line(log: &Path, words: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {words:?} in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process of the test's own, killed when dropped (also when the test fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An extra edge on the cluster file, with these etcd TLS flags.
fn edge_with(c: &DevCluster, name: &str, etcd_flags: &[String]) -> (Killed, std::path::PathBuf) {
    let log = c.dir.join(format!("{name}.log"));
    let mut args: Vec<String> = ["serve", "--role", "edge", "--cluster"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(c.cluster_file.display().to_string());
    args.extend(["--name".into(), name.into(), "--listen".into()]);
    args.push("127.0.0.1:0".into());
    args.extend(etcd_flags.iter().cloned());
    let (child, _) = spawn_iris(&args, &log);
    (Killed(child), log)
}

#[test]
fn etcd_over_https_with_client_certificates_elects_and_fails_over() {
    let (etcd, certs) = tests::etcd::Etcd::start_tls();
    let tls_flags: Vec<String> = ["--etcd-ca", "--etcd-cert", "--etcd-key"]
        .iter()
        .zip(["ca.pem", "node.pem", "node.key"])
        .flat_map(|(flag, file)| [flag.to_string(), certs.file(file)])
        .collect();
    let mut serve_args: Vec<&str> = tests::FAST_FAILURE_DETECTION.to_vec();
    serve_args.extend(tls_flags.iter().map(String::as_str));
    let mut c = DevCluster::start_with(1, 1, &["--etcd", &etcd.url], &serve_args);
    // dev-cluster returned: one node won the election through https.
    let old = c.primary_of("p0");
    let new = c
        .nodes
        .iter()
        .find(|n| n.name != old)
        .expect("two nodes")
        .name
        .clone();
    let (mut sender, _) = connect(c.edge(0), "tls-s");
    let (mut receiver, _) = connect(c.edge(0), "tls-r");
    let first = send_stored(&mut sender, "tls-r", b"before");
    c.wait_sync(&old);
    c.kill9(&old);
    c.wait_role(&new, "primary");
    let second = send_stored(&mut sender, "tls-r", b"after");
    let got = collect_deliveries(&mut receiver, 2);
    assert_eq!(
        got.iter().map(|d| d.msg_id).collect::<Vec<_>>(),
        [first, second],
        "both messages, once, in order"
    );
    assert!(c.stats(&new)["epoch"].as_u64().expect("epoch") > 1);

    // Without a client certificate: etcd ends the handshake.
    let ca_only = vec!["--etcd-ca".to_string(), certs.file("ca.pem")];
    let (no_cert, log) = edge_with(&c, "e-no-cert", &ca_only);
    let line = wait_for_log_line(&log, &["etcd watch", "failed"]);
    assert!(line.contains("BadCertificate"), "{line}");
    drop(no_cert);

    // Trusting another CA: our side refuses etcd's certificate.
    let other = c.dir.join("other-ca");
    engine::dev_cmd::certs(&other, &["127.0.0.1".to_string()], &[]).expect("iris certs");
    let wrong_ca = vec![
        "--etcd-ca".to_string(),
        other.join("ca.pem").display().to_string(),
    ];
    let (_stranger, log) = edge_with(&c, "e-wrong-ca", &wrong_ca);
    let line = wait_for_log_line(&log, &["TLS with etcd", "failed"]);
    assert!(line.contains("invalid peer certificate"), "{line}");
}
