//! `iris admin status --cluster FILE`: the cluster at a glance, from every
//! core node's admin API: per pair, which node leads, its epoch, each
//! node's role, mode and replication lag, and the pair's slots (the
//! cluster file's ranges and the slot decisions in its primary's log).
//! One JSON document on stdout; exit 0 when every pair has exactly one
//! reachable primary, 1 otherwise (the document is printed either way).
//!
//! With automatic failover (etcd), `lease_ms_left` is the primary's lease
//! time left and each node says whom etcd names as leader; without it they
//! are null.

use crate::admin_auth::Token;
use crate::admin_http::AdminClient;
use crate::cluster::ClusterSpec;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The cluster file (docs/CLUSTER.md).
    #[arg(long)]
    pub cluster: PathBuf,
}

pub fn run(args: &StatusArgs, token_file: Option<&Path>) -> ExitCode {
    let loaded = ClusterSpec::load(&args.cluster).and_then(|spec| {
        let token =
            crate::admin_http::operator_token(token_file, spec.admin_token_file.as_deref())?;
        Ok((spec, token))
    });
    let (spec, token) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("iris admin status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (doc, healthy) = status(&spec, token.as_ref());
    println!("{doc:#}");
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The document, and whether every pair has exactly one reachable primary.
pub fn status(spec: &ClusterSpec, token: Option<&Token>) -> (Value, bool) {
    let client = |admin: &str| AdminClient::new(admin, token.cloned());
    let mut healthy = true;
    let pairs: Vec<Value> = spec
        .pairs
        .iter()
        .map(|pair| {
            let nodes: Vec<Value> = pair
                .nodes
                .iter()
                .map(|n| node(&n.name, &client(&n.admin.to_string())))
                .collect();
            let primaries: Vec<&Value> = nodes.iter().filter(|n| n["role"] == "primary").collect();
            healthy &= primaries.len() == 1;
            let leader = primaries.first();
            let decisions = leader
                .and_then(|p| p["admin"].as_str())
                .and_then(|admin| match client(admin).call("GET", "/slots") {
                    Ok((200, body)) => serde_json::from_str::<Value>(&body).ok(),
                    _ => None,
                })
                .map_or(Value::Null, |v| v["decisions"].clone());
            json!({
                "name": pair.name,
                "primary": leader.map_or(Value::Null, |p| p["name"].clone()),
                "epoch": leader.map_or(Value::Null, |p| p["epoch"].clone()),
                "lease_ms_left": leader.map_or(Value::Null, |p| p["lease_ms_left"].clone()),
                "state": leader.map_or(Value::Null, |p| p["etcd_state"].clone()),
                "slots": pair.slots,
                "decisions": decisions,
                "nodes": nodes,
            })
        })
        .collect();
    (json!({ "pairs": pairs }), healthy)
}

/// One node as its admin API describes it; `reachable` false when it does
/// not answer. `lag_records`: the records its replica has not acknowledged,
/// over every shard (null for a replica or without one).
fn node(name: &str, client: &AdminClient) -> Value {
    let admin = client.addr.as_str();
    let stats = match client.call("GET", "/replication/stats") {
        Ok((200, body)) => serde_json::from_str::<Value>(&body).ok(),
        Ok((401, body)) => {
            let error =
                serde_json::from_str::<Value>(&body).map_or(Value::Null, |v| v["error"].clone());
            return json!({ "name": name, "admin": admin, "reachable": true, "error": error });
        }
        _ => None,
    };
    let Some(s) = stats else {
        return json!({ "name": name, "admin": admin, "reachable": false });
    };
    let shards = s["shards"].as_array().cloned().unwrap_or_default();
    let replicas: Vec<&Value> = shards
        .iter()
        .filter_map(|sh| sh["replicas"].as_array()?.first())
        .collect();
    let lag = (s["role"] == "primary" && !replicas.is_empty()).then(|| {
        shards
            .iter()
            .map(|sh| {
                let last = sh["last_position"].as_u64().unwrap_or(0);
                let acked = sh["replicas"][0]["acked_position"].as_u64().unwrap_or(0);
                last.saturating_sub(acked)
            })
            .sum::<u64>()
    });
    json!({
        "name": name,
        "admin": admin,
        "reachable": true,
        "role": s["role"],
        "epoch": s["epoch"],
        "mode": s["mode"],
        "replica_connected": replicas.iter().all(|r| r["connected"] == true) && !replicas.is_empty(),
        "lag_records": lag,
        "lag_ms": replicas.iter().filter_map(|r| r["lag_ms"].as_u64()).max(),
        "lease_ms_left": s["lease_ms_left"],
        "etcd_leader": s["election"]["leader"],
        "etcd_state": s["election"]["state"],
    })
}
