//! The operator's kit (`ops/`) against a real node: every metric the Grafana
//! dashboard and the Prometheus alert rules name exists in `/metrics`; every
//! flag the systemd units pass exists in `iris serve --help`; and
//! `--log-format json` writes one JSON object per log line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use tests::{connect, iris_bin, send_rejected, send_stored, Server};

fn ops_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .join("ops")
}

/// Every `iris_…` identifier in `text` (metric names in PromQL).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("iris_") {
        let start = i + at;
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded_by_ident {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The PromQL expressions of a dashboard (every `expr` value).
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            out.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_alerts_name_is_served() {
    let server = Server::start(&["--admin", "127.0.0.1:0"]);
    let admin = server.stdout_line("iris admin listening on ");
    // Some traffic, a rejection among it, so every family has samples.
    let (mut alice, _) = connect(server.addr(), "alice");
    send_stored(&mut alice, "bob", b"for the metrics");
    assert_eq!(send_rejected(&mut alice, "b", &[b'x'; 65_473]), 2);
    let (status, metrics) = engine::admin_cmd::http("GET", &admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    let served: BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ops_dir().join("grafana/iris.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 10, "a dashboard of {} queries", exprs.len());
    let rules =
        std::fs::read_to_string(ops_dir().join("prometheus/iris-alerts.yml")).expect("alert rules");
    let mut named = BTreeSet::new();
    for e in &exprs {
        named.extend(metric_names(e));
    }
    let alert_names = metric_names(&rules);
    assert!(alert_names.len() >= 5, "{alert_names:?}");
    named.extend(alert_names);
    let missing: Vec<_> = named.iter().filter(|n| !served.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named by ops/ but not in /metrics: {missing:?}\nserved: {served:?}"
    );
    // What the issue asks the dashboard to show.
    for wanted in [
        "iris_stored_total",
        "iris_stored_latency_seconds_bucket",
        "iris_fsync_latency_seconds_bucket",
        "iris_replica_lag_ms",
        "iris_mode",
        "iris_connections",
        "iris_rejected_by_code_total",
    ] {
        assert!(
            exprs.iter().any(|e| metric_names(e).contains(wanted)),
            "the dashboard shows no {wanted}"
        );
    }
    // And the alerts: degraded mode, lag, fsync stalls, a lost replica.
    for alert in [
        "IrisDegraded",
        "IrisReplicaLagging",
        "IrisFsyncStalls",
        "IrisReplicaLost",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert}");
    }
}

#[test]
fn systemd_units_pass_only_flags_iris_serve_has() {
    let help = Command::new(iris_bin())
        .args(["serve", "--help"])
        .output()
        .expect("iris serve --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut units = 0;
    for entry in std::fs::read_dir(ops_dir().join("systemd")).expect("ops/systemd") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("unit");
        units += 1;
        let exec = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .unwrap_or_else(|| panic!("{}: no ExecStart", path.display()));
        assert!(exec.contains(" serve "), "{exec}");
        for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(&format!("{flag} ")),
                "{}: {flag} is not an `iris serve` flag",
                path.display()
            );
        }
        for limit in ["LimitNOFILE=", "LimitMEMLOCK=", "KillSignal=SIGTERM"] {
            assert!(text.contains(limit), "{}: no {limit}", path.display());
        }
    }
    assert_eq!(
        units, 3,
        "iris.service, iris-core@.service, iris-edge@.service"
    );
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let server = Server::start(&["--log-format", "json"]);
    let (mut alice, _) = connect(server.addr(), "alice");
    send_stored(&mut alice, "bob", b"logged");
    let log = server.log_tail_full();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("\"iris serving\"")),
        "{log}"
    );
}
