//! `iris admin move-slots --cluster FILE --slots A-B --to PAIR`: moves a
//! slot range from the pair serving it to another, under load, through the
//! pairs' admin APIs (engine::moves runs each step on a node):
//! handoff on the source (its SENDs wait), export there, import on the
//! target, the target owns it (edges follow: MOVED), the source releases it
//! and forgets the users. Each step is safe to run again, and a run that
//! stopped part way (a failover, a timeout) is resumed by running the same
//! command again: it reads where the range stands from both pairs.

use crate::admin_auth::Token;
use crate::admin_http::AdminClient;
use crate::cluster::ClusterSpec;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long the command looks for a pair's primary before giving up.
pub const PRIMARY_WAIT: Duration = Duration::from_secs(10);
/// Read timeout of one step's request: longer than the server's step bound.
const STEP_READ_TIMEOUT_MS: u64 = 120_000;

#[derive(clap::Args, Debug)]
pub struct MoveSlotsArgs {
    /// The cluster file (docs/CLUSTER.md): the pairs and their admin addresses.
    #[arg(long)]
    pub cluster: PathBuf,
    /// The slot range, `A-B` (inclusive) or `N`; one pair must serve all of it.
    #[arg(long)]
    pub slots: String,
    /// The pair taking the range over (its name in the cluster file).
    #[arg(long)]
    pub to: String,
}

pub fn run(args: &MoveSlotsArgs, token_file: Option<&Path>) -> ExitCode {
    match move_slots(args, token_file) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iris admin move-slots: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One pair's primary as its admin API describes the range.
struct View {
    admin: AdminClient,
    pair: u16,
    version_max: u32,
    /// The decisions covering the range: (version, owner, handoff_to) per slot, coalesced.
    decisions: Vec<serde_json::Value>,
}

fn move_slots(args: &MoveSlotsArgs, token_file: Option<&Path>) -> Result<String, String> {
    let started = Instant::now();
    let spec = ClusterSpec::load(&args.cluster)?;
    let token = crate::admin_http::operator_token(token_file, spec.admin_token_file.as_deref())?;
    let (first, last) = parse_range(&args.slots)?;
    let to = spec
        .pairs
        .iter()
        .position(|p| p.name == args.to)
        .ok_or_else(|| format!("no pair {:?} in {}", args.to, args.cluster.display()))?
        as u16;
    let views: Vec<View> = (0..spec.pairs.len())
        .map(|p| view(&spec, p, token.as_ref()))
        .collect::<Result<_, _>>()?;
    // Who serves the range, and at which version, as the pairs say: the
    // highest version any pair knows for a slot decides.
    let mut states = Vec::new();
    for slot in first..=last {
        states.push(slot_state(&spec, &views, slot));
    }
    let (version, owner, handoff) = states[0];
    if states.iter().any(|s| *s != states[0]) {
        return Err(format!(
            "slots {first}-{last} are not in one state (served by several pairs, or part moved): move smaller ranges"
        ));
    }
    let target = &views[usize::from(to)];
    let summary = |from: u16, version: u32, bytes: usize| {
        serde_json::json!({
            "slots": format!("{first}-{last}"),
            "from": spec.pairs[usize::from(from)].name,
            "to": args.to,
            "version": version,
            "bytes": bytes,
            "ms": started.elapsed().as_millis() as u64,
        })
        .to_string()
    };
    if owner == to && handoff.is_none() {
        // Done, or the target owns it and the source may not have released
        // yet: release wherever the range is still handed off.
        for v in &views {
            if v.pair != to && holds_handoff(v, first, last) {
                post(
                    &v.admin,
                    &format!("/slots/release?first={first}&last={last}&to={to}&version={version}"),
                )?;
            }
        }
        return Ok(summary(owner, version, 0));
    }
    let from = owner;
    if from == to {
        return Err(format!("pair {} serves it already", args.to));
    }
    let source = &views[usize::from(from)];
    let version = match handoff {
        Some(t) if t == to => version, // resumed
        Some(t) => {
            return Err(format!(
                "the range is being moved to pair {} already: run that move again first",
                spec.pairs[usize::from(t)].name
            ))
        }
        None => views.iter().map(|v| v.version_max).max().unwrap_or(0) + 1,
    };
    let range = format!("first={first}&last={last}");
    post(
        &source.admin,
        &format!("/slots/handoff?{range}&to={to}&version={version}"),
    )?;
    let records = call(
        "GET",
        &source.admin,
        &format!("/slots/export?{range}"),
        &[],
        crate::shard::MOVE_BYTES_MAX + 4096,
    )?;
    call(
        "POST",
        &target.admin,
        &format!("/slots/import?{range}"),
        &records,
        crate::admin_http::RESPONSE_BYTES_MAX,
    )?;
    post(
        &target.admin,
        &format!("/slots/own?{range}&version={version}"),
    )?;
    post(
        &source.admin,
        &format!("/slots/release?{range}&to={to}&version={version}"),
    )?;
    Ok(summary(from, version, records.len()))
}

/// (version, owner, handoff_to) of `slot`: the cluster file's at version 0,
/// or the highest-version decision any pair reports (at one version, the
/// settled one over the handoff).
fn slot_state(spec: &ClusterSpec, views: &[View], slot: u16) -> (u32, u16, Option<u16>) {
    let mut best = (0, spec.slot_map[usize::from(slot)], None);
    for d in views.iter().flat_map(|v| &v.decisions) {
        let n = |k: &str| d[k].as_u64().unwrap_or(0);
        if !(n("first")..=n("last")).contains(&u64::from(slot)) {
            continue;
        }
        let state = (
            n("version") as u32,
            n("owner") as u16,
            d["handoff_to"].as_u64().map(|t| t as u16),
        );
        let newer =
            state.0 > best.0 || (state.0 == best.0 && best.2.is_some() && state.2.is_none());
        if newer {
            best = state;
        }
    }
    best
}

fn holds_handoff(v: &View, first: u16, last: u16) -> bool {
    v.decisions.iter().any(|d| {
        let n = |k: &str| d[k].as_u64().unwrap_or(u64::MAX);
        n("owner") == u64::from(v.pair)
            && !d["handoff_to"].is_null()
            && n("first") <= u64::from(last)
            && n("last") >= u64::from(first)
    })
}

/// The primary of pair `pair` and its decisions (waits PRIMARY_WAIT for one).
fn view(spec: &ClusterSpec, pair: usize, token: Option<&Token>) -> Result<View, String> {
    let deadline = Instant::now() + PRIMARY_WAIT;
    loop {
        for node in &spec.pairs[pair].nodes {
            let admin = AdminClient::new(node.admin.to_string(), token.cloned());
            let body = match admin.call("GET", "/slots") {
                Ok((200, body)) => body,
                Ok((401, body)) => {
                    return Err(format!("{}: HTTP 401: {}", admin.addr, body.trim_end()))
                }
                _ => continue,
            };
            let v: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("{}: /slots: {e}", admin.addr))?;
            if v["role"] != "primary" {
                continue;
            }
            return Ok(View {
                admin,
                pair: pair as u16,
                version_max: v["version_max"].as_u64().unwrap_or(0) as u32,
                decisions: v["decisions"].as_array().cloned().unwrap_or_default(),
            });
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "pair {} has no primary answering on its admin address",
                spec.pairs[pair].name
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn post(admin: &AdminClient, path: &str) -> Result<(), String> {
    call(
        "POST",
        admin,
        path,
        &[],
        crate::admin_http::RESPONSE_BYTES_MAX,
    )
    .map(drop)
}

/// One step's request: the response body on 200; otherwise the status and
/// body as the error.
fn call(
    method: &str,
    admin: &AdminClient,
    path: &str,
    body: &[u8],
    response_max: usize,
) -> Result<Vec<u8>, String> {
    let (status, body) =
        admin.call_bytes(method, path, body, response_max, STEP_READ_TIMEOUT_MS)?;
    if status != 200 {
        let body = String::from_utf8_lossy(&body);
        return Err(format!(
            "{} {method} {path}: HTTP {status}: {}",
            admin.addr,
            body.trim_end()
        ));
    }
    Ok(body)
}

/// `"A-B"` or `"N"`, within the slots.
fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!(
            "--slots {s:?}: expected A-B or N, slots 0..{}",
            net::SLOT_COUNT
        )
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let n = s.trim().parse().map_err(|_| bad())?;
            (n, n)
        }
    };
    if a > b || b >= net::SLOT_COUNT {
        return Err(bad());
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_bad_ones_are_errors() {
        assert_eq!(parse_range("5-9"), Ok((5, 9)));
        assert_eq!(parse_range("16383"), Ok((16383, 16383)));
        for bad in ["9-5", "16384", "a-b", "", "1-16384"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }
}
