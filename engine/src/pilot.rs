//! Drives a core node's [`election::Pilot`] against a real etcd, on the
//! control thread's tokio runtime: it reads the node's facts from
//! [`NodeStats`], makes the pilot's requests (one at a time, each with a
//! deadline) and hands its actions to the cores through [`NodeStats`]. A
//! core never waits on etcd: it reads the lease deadline and the flags.

use crate::clock::mono_us;
use crate::election::{Action, Facts, Leader, PairState, Pilot, Reply, Request, Settings};
use crate::etcd::Etcd;
use crate::stats::{NodeStats, Role};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// How often the pilot looks at the node when it has no request to make
/// (also while it waits out the backoff after a failed request:
/// election::RETRY_BACKOFF_MIN_US).
const STEP_EVERY: Duration = Duration::from_millis(10);
/// A repeated warning is logged at most this often.
const WARN_EVERY_US: u64 = 5_000_000;

/// The etcd keys of one pair.
#[derive(Debug, Clone)]
pub struct PairKeys {
    pub leader: String,
    pub state: String,
}

impl PairKeys {
    pub fn new(prefix: &str, pair: &str) -> PairKeys {
        PairKeys {
            leader: format!("{prefix}/pairs/{pair}/leader"),
            state: format!("{prefix}/pairs/{pair}/state"),
        }
    }
}

/// The default key prefix of a cluster in etcd.
pub const PREFIX_DEFAULT: &str = "iris";

/// The etcd client and the cluster's key prefix, when etcd is configured.
pub fn client(e: &crate::config::ElectionConfig) -> Result<Option<(Etcd, String)>, String> {
    let Some(endpoints) = &e.etcd else {
        return Ok(None);
    };
    let tls = match (&e.etcd_ca, &e.etcd_cert, &e.etcd_key) {
        (None, None, None) => None,
        (Some(ca), None, None) => Some(crate::etcd::EtcdTls::load(ca, None)?),
        (Some(ca), Some(cert), Some(key)) => {
            Some(crate::etcd::EtcdTls::load(ca, Some((cert, key)))?)
        }
        (None, _, _) => return Err("etcd_cert and etcd_key need etcd_ca (--etcd-ca)".into()),
        _ => return Err("etcd_cert and etcd_key (--etcd-cert, --etcd-key) go together".into()),
    };
    let etcd = Etcd::new(endpoints, Duration::from_millis(e.request_timeout_ms), tls)?;
    let prefix = e.prefix.clone().unwrap_or_else(|| PREFIX_DEFAULT.into());
    Ok(Some((etcd, prefix)))
}

pub fn settings(c: &crate::config::Config) -> Settings {
    let e = &c.election;
    Settings {
        ttl_ms: e.lease_ttl_ms,
        margin_ms: e.lease_margin_ms,
        renew_every_ms: e.renew_every_ms,
        observe_every_ms: e.observe_every_ms,
        settle_ms: 3 * crate::runtime::MAINTENANCE_TICK.as_millis() as u64,
        may_serve_alone: c.replication.on_replica_loss == crate::config::LossPolicy::Degrade,
    }
}

fn facts(stats: &NodeStats) -> Facts {
    let shards = &stats.shards;
    Facts {
        primary: stats.role() == Role::Primary,
        epoch: stats.epoch.load(SeqCst),
        synced: shards.iter().all(|s| s.synced.load(Relaxed)),
        wants_alone: shards.iter().any(|s| s.wants_alone.load(Relaxed)),
        promote_asked: stats.election_promote_asked.load(SeqCst),
        hold: mono_us() < stats.campaign_hold_until_us.load(SeqCst),
    }
}

/// Runs for the process's life; on a clean stop it hands the lease back first.
pub async fn run(
    etcd: Etcd,
    keys: PairKeys,
    me: String,
    settings: Settings,
    stats: Arc<NodeStats>,
) {
    stats.elected.store(true, SeqCst);
    // No lease yet: nothing may be acknowledged, and nothing degrades alone.
    stats.lease_deadline_us.store(0, SeqCst);
    stats.alone_allowed.store(false, SeqCst);
    tracing::info!(etcd = ?etcd.endpoints(), leader_key = %keys.leader, "election: following the pair's leader key in etcd");
    let mut pilot = Pilot::new(&me, settings);
    let mut last_warn: Option<u64> = None;
    let mut last_failure: Option<u64> = None;
    loop {
        if crate::sys::SHUTDOWN.load(SeqCst)
            && crate::runtime::cores_drained() >= stats.shards.len()
        {
            resign(&etcd, &mut pilot, &stats, &mut last_warn).await;
            stats.lease_released.store(true, SeqCst);
            return;
        }
        if stats.resign_asked.swap(false, SeqCst) {
            // A handover: the cores stepped down with the replica holding
            // everything; the key goes, and our campaign waits (facts.hold).
            resign(&etcd, &mut pilot, &stats, &mut last_warn).await;
            continue;
        }
        let (actions, request) = pilot.step(mono_us(), facts(&stats));
        apply(&stats, actions, &mut last_warn);
        let Some(request) = request else {
            tokio::time::sleep(STEP_EVERY).await;
            continue;
        };
        tracing::debug!(?request, "election: request");
        let reply = match execute(&etcd, &keys, settings.ttl_ms, &request).await {
            Ok(reply) => reply,
            Err(e) => {
                let now = mono_us();
                if last_failure.is_none_or(|t| now.saturating_sub(t) >= WARN_EVERY_US) {
                    last_failure = Some(now);
                    tracing::warn!(error = %e, ?request, "election: etcd request failed (repeats logged every 5 s)");
                }
                Reply::Failed
            }
        };
        tracing::debug!(?reply, "election: reply");
        let actions = pilot.answer(mono_us(), facts(&stats), reply);
        apply(&stats, actions, &mut last_warn);
        *stats.leader_seen.lock().expect("not poisoned") =
            pilot.seen.as_ref().map(|l| (l.node.clone(), l.epoch));
        *stats.pair_state.lock().expect("not poisoned") = pilot.state().map(|s| s.safety.name());
    }
}

/// How long a cleanly stopping node waits for the lease's revocation
/// (`request_timeout_ms` per endpoint tried, and a little more).
pub fn resign_wait(e: &crate::config::ElectionConfig) -> Duration {
    let endpoints = e
        .etcd
        .as_deref()
        .map_or(1, |s| s.split(',').filter(|p| !p.trim().is_empty()).count())
        .max(1) as u64;
    Duration::from_millis(endpoints * e.request_timeout_ms + RESIGN_PAUSE.as_millis() as u64 + 100)
}

/// Between the cores' last acknowledgement under the lease and its
/// revocation: a core reads the deadline once per turn, and a turn that
/// read it before the stop ends well within this.
const RESIGN_PAUSE: Duration = Duration::from_millis(10);

/// SIGTERM, the cores drained: no acknowledgement from now on, then the
/// lease revoked, which deletes our leader key in etcd; the replica (in
/// sync, or it would not campaign) is elected within about an observation
/// period instead of the lease's TTL.
async fn resign(etcd: &Etcd, pilot: &mut Pilot, stats: &NodeStats, last_warn: &mut Option<u64>) {
    let (actions, lease) = pilot.resign();
    apply(stats, actions, last_warn);
    let Some(lease) = lease else { return };
    tokio::time::sleep(RESIGN_PAUSE).await;
    match etcd.revoke(lease).await {
        Ok(()) => tracing::warn!(
            lease,
            "election: stopping; lease handed back, the peer may take over now"
        ),
        Err(e) => {
            tracing::warn!(error = %e, lease, "election: stopping; could not hand the lease back, it expires by its TTL")
        }
    }
}

fn apply(stats: &NodeStats, actions: Vec<Action>, last_warn: &mut Option<u64>) {
    for a in actions {
        match a {
            Action::Deadline(us) => stats.lease_deadline_us.store(us, SeqCst),
            Action::AllowAlone(allowed) => stats.alone_allowed.store(allowed, SeqCst),
            Action::Serve { epoch } => {
                tracing::warn!(epoch, "election: won; serving as primary");
                stats.election_promote_asked.store(false, SeqCst);
                stats.demote_requested.store(false, SeqCst);
                stats.promote_epoch.store(epoch, SeqCst);
                stats.promote_requested.store(true, SeqCst);
            }
            Action::StepDown { why } => {
                if !stats.demote_requested.swap(true, SeqCst) {
                    tracing::error!(%why, "election: stepping down; following the peer");
                }
                stats.promote_requested.store(false, SeqCst);
            }
            Action::Warn(text) => {
                let now = mono_us();
                if last_warn.is_none_or(|t| now.saturating_sub(t) >= WARN_EVERY_US) {
                    *last_warn = Some(now);
                    tracing::error!("election: {text}");
                }
            }
        }
    }
}

async fn execute(
    etcd: &Etcd,
    keys: &PairKeys,
    ttl_ms: u64,
    req: &Request,
) -> Result<Reply, crate::etcd::EtcdError> {
    let sent_us = mono_us();
    Ok(match req {
        Request::Grant => {
            let (lease, ttl_secs) = etcd.grant(ttl_ms.div_ceil(1000)).await?;
            Reply::Granted {
                lease,
                ttl_ms: ttl_secs * 1000,
                sent_us,
            }
        }
        Request::Renew { lease } => Reply::Renewed {
            ttl_ms: etcd.keepalive(*lease).await? * 1000,
            sent_us,
        },
        Request::Observe => {
            let leader = etcd.get(&keys.leader).await?.map(|kv| Leader {
                node: kv.value,
                epoch: kv.create_revision,
            });
            let state = etcd
                .get(&keys.state)
                .await?
                .and_then(|kv| PairState::decode(&kv.value));
            Reply::Observed { leader, state }
        }
        Request::Campaign { lease, state } => {
            let me = state.leader.as_str();
            let also = state.encode();
            match etcd
                .create(&keys.leader, me, *lease, Some((&keys.state, &also)))
                .await?
            {
                Ok(epoch) => Reply::Won { epoch },
                Err(holder) => Reply::Lost {
                    leader: holder.map(|kv| Leader {
                        node: kv.value,
                        epoch: kv.create_revision,
                    }),
                },
            }
        }
        Request::WriteState { epoch, state } => Reply::StateWritten {
            ok: etcd
                .put_guarded(&keys.leader, *epoch, &keys.state, &state.encode())
                .await?,
        },
    })
}

/// Backoff between watch attempts of an edge (doubling up to the max).
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A watch session ends after this long and starts again (keys re-read).
const WATCH_SESSION_MAX: Duration = Duration::from_secs(10);
/// Keys read at once when a watch (re)starts: a leader and a state key per pair.
const WATCH_KEYS_MAX: u64 = 2 * crate::cluster::PAIRS_MAX as u64;

/// An edge's view of the elections: a thread with its own current-thread
/// runtime reads every pair's leader key, then watches them; each pair's
/// entry holds the highest leader epoch seen. The edge cores read it
/// (engine::link::follow_elected) and never wait on etcd.
pub fn spawn_edge_watch(
    etcd: Etcd,
    prefix: String,
    pairs: Vec<String>,
) -> Result<Arc<[std::sync::atomic::AtomicU64]>, String> {
    let table: Arc<[std::sync::atomic::AtomicU64]> = pairs
        .iter()
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the etcd watch runtime: {e}"))?;
    let shared = table.clone();
    std::thread::Builder::new()
        .name("iris-etcd-watch".into())
        .spawn(move || runtime.block_on(watch_leaders(etcd, prefix, pairs, shared)))
        .map_err(|e| format!("cannot start the etcd watch thread: {e}"))?;
    Ok(table)
}

async fn watch_leaders(
    etcd: Etcd,
    prefix: String,
    pairs: Vec<String>,
    table: Arc<[std::sync::atomic::AtomicU64]>,
) {
    let root = format!("{prefix}/pairs/");
    let apply = |kv: &crate::etcd::Kv| {
        let Some(rest) = kv.key.strip_prefix(&root) else {
            return;
        };
        let Some(pair) = rest.strip_suffix("/leader") else {
            return;
        };
        if let Some(i) = pairs.iter().position(|p| p == pair) {
            let before = table[i].fetch_max(kv.create_revision, SeqCst);
            if kv.create_revision > before {
                tracing::info!(pair, leader = %kv.value, epoch = kv.create_revision, "etcd: pair leader");
            }
        }
    };
    let mut backoff = WATCH_BACKOFF_MIN;
    loop {
        let result = async {
            for kv in etcd.get_prefix(&root, WATCH_KEYS_MAX).await? {
                apply(&kv);
            }
            // A watch session is bounded: a silent etcd (cut off) cannot
            // hold it forever; the next session reads the keys again.
            let watch = etcd.watch_prefix(&root, |ev| {
                if let crate::etcd::WatchEvent::Put(kv) = ev {
                    apply(&kv);
                }
            });
            match tokio::time::timeout(WATCH_SESSION_MAX, watch).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
        .await;
        match result {
            Ok(()) => {
                backoff = WATCH_BACKOFF_MIN;
                tokio::time::sleep(WATCH_BACKOFF_MIN).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd watch of the pairs' leaders failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
            }
        }
    }
}
