//! Who leads a core pair: the election in etcd, as a state machine with no
//! I/O (the network, the clock and etcd are the caller's), so the same code
//! runs in `iris serve` (engine::pilot drives it against a real etcd) and in
//! the seeded simulator (engine::sim) against a simulated one.
//!
//! The protocol (docs/CLUSTER.md "Automatic failover"):
//! - Every node holds a lease. The primary is the node whose name is in the
//!   pair's leader key, created under its lease; the key's creation revision
//!   is the new **epoch**. It only grows, cluster-wide: the fencing token.
//! - The leader renews its lease every `renew_every_ms`. Its **deadline** is
//!   the send time of the last renewal etcd answered, plus the TTL, minus
//!   `margin_ms`: etcd counts the TTL from when the renewal arrived, which is
//!   later, so past the deadline the lease may still exist but cannot have
//!   expired before it. The cores refuse to answer STORED or take SENDs from
//!   the deadline on, whatever this state machine is doing (a paused control
//!   thread included); the state machine steps down there too.
//! - The pair's state key says whether a takeover is safe: `sync` while the
//!   primary's replica holds every message it acknowledged, `alone` once it
//!   may acknowledge on its own disk only (degraded mode). The primary writes
//!   `alone` before it degrades, and `sync` once its replica has caught up
//!   with everything acknowledged alone. A node campaigns when the leader key
//!   is gone and the state is `sync`, or it was the last leader, or an
//!   operator asked (`iris admin promote`): a replica never takes over from a
//!   primary that may hold acknowledged messages it lacks.

use std::fmt;

/// After a failed etcd request the next one waits: this long after the first
/// failure, doubling with each consecutive one up to
/// [`RETRY_BACKOFF_MAX_US`], each wait jittered down to as little as half
/// (so the nodes of a cluster do not retry in step). The first answer resets
/// it. Without it a node whose etcd refused connections asked again at once,
/// about 1,500 times a second (issue 21). Small at first so that one lost
/// request costs a leader's renewal or a takeover little (the failover
/// budget is about 1.5 s).
pub const RETRY_BACKOFF_MIN_US: u64 = 25_000;
/// The longest wait between two attempts while etcd stays unreachable:
/// about one attempt a second, and a node notices etcd's return within it.
pub const RETRY_BACKOFF_MAX_US: u64 = 1_000_000;
const _: () = assert!(RETRY_BACKOFF_MIN_US > 0 && RETRY_BACKOFF_MIN_US <= RETRY_BACKOFF_MAX_US);

/// The wait before the next request after `failures` (≥ 1) consecutive
/// failures: the doubled delay, less up to half of it by `seed`.
pub fn retry_backoff_us(failures: u32, seed: u64) -> u64 {
    assert!(failures >= 1);
    let full = RETRY_BACKOFF_MIN_US
        .saturating_mul(1 << (failures - 1).min(63))
        .min(RETRY_BACKOFF_MAX_US);
    let half = full / 2;
    full - splitmix64(seed) % (half + 1)
}

/// A well-mixed 64-bit function of `x` (SplitMix64's finalizer): the jitter,
/// deterministic in the time and node it is given (the simulator replays it).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the pair's state key says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safety {
    /// The replica holds every acknowledged message: either node may lead.
    Sync,
    /// The leader may acknowledge alone: only it may lead next.
    Alone,
}

impl Safety {
    pub fn name(self) -> &'static str {
        match self {
            Safety::Sync => "sync",
            Safety::Alone => "alone",
        }
    }
}

/// The pair's state key: the last leader and what its replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairState {
    pub leader: String,
    pub safety: Safety,
}

impl PairState {
    pub fn encode(&self) -> String {
        format!("{} {}", self.safety.name(), self.leader)
    }

    /// `None` for a value this version does not know (then nobody campaigns
    /// on its own: an operator decides).
    pub fn decode(s: &str) -> Option<PairState> {
        let (safety, leader) = s.split_once(' ')?;
        let safety = match safety {
            "sync" => Safety::Sync,
            "alone" => Safety::Alone,
            _ => return None,
        };
        (!leader.is_empty()).then(|| PairState {
            leader: leader.to_string(),
            safety,
        })
    }
}

/// The pair's leader key as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub node: String,
    /// The key's creation revision: the leader's epoch.
    pub epoch: u64,
}

/// Timing of the election (named settings with defaults in config).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub ttl_ms: u64,
    pub margin_ms: u64,
    pub renew_every_ms: u64,
    pub observe_every_ms: u64,
    /// After forbidding the cores to degrade, wait this long (more than a
    /// maintenance tick) before trusting that none did.
    pub settle_ms: u64,
    /// Whether this node may serve alone (on_replica_loss = degrade).
    pub may_serve_alone: bool,
}

/// What the node reports at every step.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// Its shards act as primary (promoted and not stepped down).
    pub primary: bool,
    /// The highest epoch it has seen.
    pub epoch: u64,
    /// Every shard has a replica holding every message it acknowledged.
    pub synced: bool,
    /// A shard lost its replica and would degrade (needs `alone` first).
    pub wants_alone: bool,
    /// An operator asked for a promotion.
    pub promote_asked: bool,
    /// This node just handed its role over (engine::handover): it does not
    /// campaign, so that the replica it handed over to wins.
    pub hold: bool,
}

/// A request to etcd; its answer comes back as a [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Grant,
    Renew {
        lease: i64,
    },
    /// Read the leader and state keys.
    Observe,
    /// Create the leader key under `lease` and write the state in one txn.
    Campaign {
        lease: i64,
        state: PairState,
    },
    /// Write the state key while the leader key still has `epoch`.
    WriteState {
        epoch: u64,
        state: PairState,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `sent_us`: when the request left (the lease's TTL counts after it).
    Granted {
        lease: i64,
        ttl_ms: u64,
        sent_us: u64,
    },
    /// ttl_ms 0: the lease is gone.
    Renewed {
        ttl_ms: u64,
        sent_us: u64,
    },
    Observed {
        leader: Option<Leader>,
        state: Option<PairState>,
    },
    Won {
        epoch: u64,
    },
    Lost {
        leader: Option<Leader>,
    },
    StateWritten {
        ok: bool,
    },
    /// Unreachable, timed out or unreadable: nothing learned.
    Failed,
}

/// What the node must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Serve as primary with this epoch.
    Serve { epoch: u64 },
    /// Stop serving: become a replica of the peer.
    StepDown { why: String },
    /// The cores' lease deadline (µs on the node's monotonic clock):
    /// u64::MAX none needed, 0 expired.
    Deadline(u64),
    /// Whether the cores may degrade (acknowledge without the replica).
    AllowAlone(bool),
    /// Say it loudly (rate-limited by the caller).
    Warn(String),
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    /// When etcd may have dropped it at the earliest: last renewal sent + TTL.
    expiry_us: u64,
    /// expiry minus the margin: the cores' deadline.
    deadline_us: u64,
}

/// One node's side of its pair's election.
pub struct Pilot {
    me: String,
    s: Settings,
    lease: Option<Lease>,
    /// Our epoch while we hold the leader key.
    leading: Option<u64>,
    /// The state as last written or observed.
    state: Option<PairState>,
    /// When AllowAlone(false) was last given (to let the cores settle).
    alone_revoked_at: Option<u64>,
    allowed_alone: bool,
    next_renew_us: u64,
    next_observe_us: u64,
    in_flight: Option<Request>,
    /// A campaign decided on an observation: the next request.
    campaign_next: Option<Request>,
    /// Requests failed in a row (reset by any answer).
    failures: u32,
    /// No request before this time after a failure ([`retry_backoff_us`]).
    retry_at_us: u64,
    /// This node's part of the jitter (a hash of its name).
    jitter_seed: u64,
    /// The last leader seen (status).
    pub seen: Option<Leader>,
}

impl fmt::Debug for Pilot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pilot")
            .field("me", &self.me)
            .field("leading", &self.leading)
            .field("lease", &self.lease.map(|l| l.id))
            .field("state", &self.state)
            .finish()
    }
}

impl Pilot {
    pub fn new(me: &str, settings: Settings) -> Pilot {
        Pilot {
            me: me.to_string(),
            s: settings,
            lease: None,
            leading: None,
            state: None,
            alone_revoked_at: None,
            allowed_alone: false,
            next_renew_us: 0,
            next_observe_us: 0,
            in_flight: None,
            campaign_next: None,
            failures: 0,
            retry_at_us: 0,
            jitter_seed: me.bytes().fold(0, |h, b| splitmix64(h ^ u64::from(b))),
            seen: None,
        }
    }

    /// The pair's state as last written or read.
    pub fn state(&self) -> Option<&PairState> {
        self.state.as_ref()
    }

    pub fn leading(&self) -> Option<u64> {
        self.leading
    }

    /// A clean stop (SIGTERM, after the cores answered what was in flight):
    /// stop acknowledging now, and give back the lease, returned here, so
    /// that etcd deletes our leader key at once and the replica takes over
    /// without waiting out the TTL. Revoking it is the caller's (the
    /// driver's) request; nothing is asked of etcd by this pilot any more.
    pub fn resign(&mut self) -> (Vec<Action>, Option<i64>) {
        let mut out = vec![Action::Deadline(0)];
        if self.allowed_alone {
            self.allowed_alone = false;
            out.push(Action::AllowAlone(false));
        }
        self.leading = None;
        self.campaign_next = None;
        (out, self.lease.take().map(|l| l.id))
    }

    fn lose(&mut self, why: String, out: &mut Vec<Action>) {
        if self.leading.take().is_some() {
            out.push(Action::Deadline(0));
            out.push(Action::StepDown { why });
            // Let the lease go (no more renewals): past the deadline it may
            // still hold our leader key in etcd, and renewed, it would hold
            // it for ever with nobody serving under it.
            self.lease = None;
        }
        if self.allowed_alone {
            self.allowed_alone = false;
            out.push(Action::AllowAlone(false));
        }
    }

    /// Advances the clock: actions to take now and, when no request is in
    /// flight, the next one to make.
    pub fn step(&mut self, now_us: u64, facts: Facts) -> (Vec<Action>, Option<Request>) {
        let mut out = Vec::new();
        // Past the deadline we are no longer a leader, whatever etcd says later.
        if let Some(l) = self.lease {
            if self.leading.is_some() && now_us >= l.deadline_us {
                self.lose(format!("lease {} not renewed in time", l.id), &mut out);
            }
            if now_us >= l.expiry_us {
                self.lease = None;
            }
        }
        if self.leading.is_none() && facts.primary {
            // Serving without the key (a leftover of a lost lease): stop.
            out.push(Action::Deadline(0));
            out.push(Action::StepDown {
                why: "serving without holding the leader key".into(),
            });
        }
        if self.in_flight.is_some() || now_us < self.retry_at_us {
            return (out, None);
        }
        let req = self.next_request(now_us, facts, &mut out);
        self.in_flight = req.clone();
        (out, req)
    }

    fn next_request(
        &mut self,
        now_us: u64,
        facts: Facts,
        out: &mut Vec<Action>,
    ) -> Option<Request> {
        let Some(lease) = self.lease else {
            self.campaign_next = None;
            return Some(Request::Grant);
        };
        if let Some(req) = self.campaign_next.take() {
            return Some(req);
        }
        // Every node keeps its lease alive: a replica campaigns with it.
        if now_us >= self.next_renew_us {
            return Some(Request::Renew { lease: lease.id });
        }
        if let Some(epoch) = self.leading {
            let alone = self
                .state
                .as_ref()
                .is_some_and(|s| s.safety == Safety::Alone);
            if facts.wants_alone && self.s.may_serve_alone && !alone {
                return Some(Request::WriteState {
                    epoch,
                    state: self.state_of(Safety::Alone),
                });
            }
            if alone && facts.synced && !facts.wants_alone {
                match self.alone_revoked_at {
                    None => {
                        self.allowed_alone = false;
                        self.alone_revoked_at = Some(now_us);
                        out.push(Action::AllowAlone(false));
                    }
                    Some(t) if now_us >= t + self.s.settle_ms * 1000 => {
                        return Some(Request::WriteState {
                            epoch,
                            state: self.state_of(Safety::Sync),
                        });
                    }
                    Some(_) => {}
                }
            } else if alone && self.alone_revoked_at.take().is_some() && !self.allowed_alone {
                // Not synced after all (a shard lost its replica again).
                self.allowed_alone = true;
                out.push(Action::AllowAlone(true));
            }
        }
        if now_us >= self.next_observe_us {
            return Some(Request::Observe);
        }
        None
    }

    fn state_of(&self, safety: Safety) -> PairState {
        PairState {
            leader: self.me.clone(),
            safety,
        }
    }

    /// The answer to the request in flight.
    pub fn answer(&mut self, now_us: u64, facts: Facts, reply: Reply) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(req) = self.in_flight.take() else {
            return out;
        };
        if reply == Reply::Failed {
            self.failures = self.failures.saturating_add(1);
            let seed = now_us ^ self.jitter_seed;
            self.retry_at_us = now_us + retry_backoff_us(self.failures, seed);
        } else {
            self.failures = 0;
            self.retry_at_us = 0;
        }
        let ttl_us = self.s.ttl_ms * 1000;
        let margin_us = self.s.margin_ms * 1000;
        match (req, reply) {
            (
                Request::Grant,
                Reply::Granted {
                    lease,
                    ttl_ms,
                    sent_us,
                },
            ) => {
                let expiry_us = sent_us + ttl_ms.min(self.s.ttl_ms) * 1000;
                self.lease = Some(Lease {
                    id: lease,
                    expiry_us,
                    deadline_us: expiry_us.saturating_sub(margin_us),
                });
                self.next_observe_us = 0;
                self.next_renew_us = now_us + self.s.renew_every_ms * 1000;
            }
            (Request::Renew { lease }, Reply::Renewed { ttl_ms, sent_us }) => {
                if ttl_ms == 0 {
                    self.lease = None;
                    self.lose(format!("lease {lease} expired in etcd"), &mut out);
                } else if let Some(l) = self.lease.as_mut().filter(|l| l.id == lease) {
                    let expiry = sent_us + ttl_us;
                    l.expiry_us = l.expiry_us.max(expiry);
                    l.deadline_us = l.expiry_us.saturating_sub(margin_us);
                    self.next_renew_us = now_us.max(sent_us) + self.s.renew_every_ms * 1000;
                    if self.leading.is_some() {
                        out.push(Action::Deadline(l.deadline_us));
                    }
                }
            }
            (Request::Observe, Reply::Observed { leader, state }) => {
                self.next_observe_us = now_us + self.s.observe_every_ms * 1000;
                self.seen = leader.clone();
                if state.is_some() || self.leading.is_none() {
                    self.state = state.clone();
                }
                match (&leader, self.leading) {
                    (Some(l), Some(epoch)) if l.node == self.me && l.epoch == epoch => {}
                    (_, Some(epoch)) => {
                        let why = match &leader {
                            Some(l) => format!(
                                "{} leads with epoch {} (ours was {epoch})",
                                l.node, l.epoch
                            ),
                            None => format!("the leader key of epoch {epoch} is gone"),
                        };
                        self.lose(why, &mut out);
                    }
                    (Some(_), None) => {}
                    (None, None) => {
                        // Campaign at once, on the same observation.
                        self.campaign_next = self.campaign(facts, state.as_ref(), &mut out);
                    }
                }
            }
            (Request::Campaign { state, .. }, Reply::Won { epoch }) => {
                self.next_observe_us = now_us + self.s.observe_every_ms * 1000;
                if epoch <= facts.epoch {
                    out.push(Action::Warn(format!(
                        "won the election with epoch {epoch} but this node has seen epoch {}: \
                         etcd was reset or belongs to another cluster; not serving",
                        facts.epoch
                    )));
                    return out;
                }
                let Some(l) = self.lease else {
                    return out;
                };
                self.leading = Some(epoch);
                self.state = Some(state.clone());
                self.seen = Some(Leader {
                    node: self.me.clone(),
                    epoch,
                });
                self.alone_revoked_at = None;
                self.allowed_alone = state.safety == Safety::Alone;
                out.push(Action::AllowAlone(self.allowed_alone));
                out.push(Action::Deadline(l.deadline_us));
                out.push(Action::Serve { epoch });
                self.next_renew_us = 0; // renew at once: a fresh deadline
            }
            (Request::Campaign { .. }, Reply::Lost { leader }) => {
                self.seen = leader;
                self.next_observe_us = now_us + self.s.observe_every_ms * 1000;
            }
            (Request::WriteState { state, .. }, Reply::StateWritten { ok }) => {
                if ok {
                    self.allowed_alone = state.safety == Safety::Alone;
                    self.alone_revoked_at = None;
                    self.state = Some(state);
                    out.push(Action::AllowAlone(self.allowed_alone));
                } else {
                    // Our key is gone: the next observation says who leads.
                    self.next_observe_us = 0;
                }
            }
            (Request::Campaign { .. }, Reply::Failed) => {
                // The txn may have created our leader key: let the lease go
                // so that such a key expires instead of being renewed with
                // nobody serving under it.
                self.lease = None;
                self.next_observe_us = now_us + self.s.observe_every_ms * 1000;
            }
            (Request::WriteState { .. }, Reply::Failed) => {
                // The put may have landed: the state in etcd is unknown until
                // observed. Believing the old one would let the cores degrade
                // on an `alone` that a lost `sync` replaced (then the replica
                // may take over without what was acknowledged alone).
                self.state = None;
                self.next_observe_us = now_us + self.s.observe_every_ms * 1000;
            }
            (_, Reply::Failed) => {
                // Nothing learned; the deadline protects the rest. Retry soon.
                self.next_observe_us = now_us + self.s.observe_every_ms * 1000;
            }
            (req, reply) => out.push(Action::Warn(format!(
                "election: answer {reply:?} does not fit request {req:?}"
            ))),
        }
        out
    }

    /// Whether to campaign now that no leader is there.
    fn campaign(
        &mut self,
        facts: Facts,
        state: Option<&PairState>,
        out: &mut Vec<Action>,
    ) -> Option<Request> {
        let lease = self.lease?;
        if facts.hold {
            return None;
        }
        if facts.primary {
            // The cores still act as primary of an epoch this node lost
            // (they step down at their next tick). Winning now, the Serve
            // would cancel that step-down and find them still primary, so
            // not promoted: serving the old epoch under the new lease.
            return None;
        }
        let eligible = match state {
            None => true,
            Some(s) => s.safety == Safety::Sync || s.leader == self.me,
        };
        if !eligible && !facts.promote_asked {
            let last = state.map(|s| s.leader.as_str()).unwrap_or("?");
            out.push(Action::Warn(format!(
                "pair has no primary and this node does not take over: the last primary, {last}, \
                 acknowledged messages alone (degraded) that this node may lack. Start {last} again, \
                 or promote this node by hand (iris admin promote) and accept their loss"
            )));
            return None;
        }
        let safety = if self.s.may_serve_alone {
            Safety::Alone
        } else {
            Safety::Sync
        };
        Some(Request::Campaign {
            lease: lease.id,
            state: self.state_of(safety),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            ttl_ms: 1000,
            margin_ms: 200,
            renew_every_ms: 250,
            observe_every_ms: 100,
            settle_ms: 150,
            may_serve_alone: true,
        }
    }

    fn run_to_leading(p: &mut Pilot) -> u64 {
        let f = Facts::default();
        let (_, r) = p.step(0, f);
        assert_eq!(r, Some(Request::Grant));
        p.answer(
            1_000,
            f,
            Reply::Granted {
                lease: 7,
                ttl_ms: 1000,
                sent_us: 0,
            },
        );
        let (_, r) = p.step(2_000, f);
        assert_eq!(r, Some(Request::Observe));
        p.answer(
            3_000,
            f,
            Reply::Observed {
                leader: None,
                state: None,
            },
        );
        let (_, r) = p.step(3_000, f);
        assert!(matches!(r, Some(Request::Campaign { lease: 7, .. })));
        let acts = p.answer(4_000, f, Reply::Won { epoch: 12 });
        assert!(acts.contains(&Action::Serve { epoch: 12 }));
        assert!(acts.contains(&Action::Deadline(800_000)));
        12
    }

    /// After a handover the node holds its campaign (facts.hold): a free
    /// leader key with a `sync` state is left to the replica it handed
    /// over to; without the hold it campaigns on the same observation.
    #[test]
    fn a_node_that_handed_over_does_not_campaign_while_it_holds() {
        for hold in [true, false] {
            let mut p = Pilot::new("a", settings());
            let f = Facts {
                hold,
                ..Facts::default()
            };
            let (_, r) = p.step(0, f);
            assert_eq!(r, Some(Request::Grant));
            p.answer(
                1_000,
                f,
                Reply::Granted {
                    lease: 7,
                    ttl_ms: 1000,
                    sent_us: 0,
                },
            );
            let (_, r) = p.step(2_000, f);
            assert_eq!(r, Some(Request::Observe));
            let sync = PairState {
                leader: "a".into(),
                safety: Safety::Sync,
            };
            p.answer(
                3_000,
                f,
                Reply::Observed {
                    leader: None,
                    state: Some(sync),
                },
            );
            let (_, r) = p.step(3_000, f);
            let campaigns = matches!(r, Some(Request::Campaign { .. }));
            assert_eq!(campaigns, !hold, "hold {hold}: {r:?}");
        }
    }

    /// etcd refuses every connection: after each failure the next request
    /// waits out the backoff (doubling, jittered down to half, capped), and
    /// the first answer resets it. Red without the backoff: the Grant was
    /// asked again at the instant of the failure.
    #[test]
    fn after_a_failure_the_next_request_waits_out_a_growing_capped_backoff() {
        let mut p = Pilot::new("a", settings());
        let f = Facts::default();
        let mut now = 0;
        assert_eq!(p.step(now, f).1, Some(Request::Grant));
        let mut waits = Vec::new();
        for failures in 1..=12u32 {
            p.answer(now, f, Reply::Failed);
            let full = (RETRY_BACKOFF_MIN_US << (failures - 1).min(20)).min(RETRY_BACKOFF_MAX_US);
            // Not before half the full wait; by the full wait.
            assert_eq!(
                p.step(now, f).1,
                None,
                "failure {failures}: asked again at once"
            );
            assert_eq!(p.step(now + full / 2 - 1, f).1, None, "failure {failures}");
            let mut at = now + full / 2;
            while p.step(at, f).1.is_none() {
                at += 1_000;
                assert!(
                    at <= now + full,
                    "failure {failures}: no request by {full} µs"
                );
            }
            waits.push(at - now);
            now = at; // the Grant asked at `at` is in flight
        }
        assert!(waits[0] <= RETRY_BACKOFF_MIN_US);
        assert!((RETRY_BACKOFF_MAX_US / 2..=RETRY_BACKOFF_MAX_US).contains(&waits[11]));
        // Ten seconds of a dead etcd, stepped as the driver does (every
        // 10 ms): about one attempt a second, not thousands.
        p.answer(now, f, Reply::Failed);
        let mut attempts = 0;
        let end = now + 10_000_000;
        while now < end {
            now += 10_000;
            if p.step(now, f).1.is_some() {
                attempts += 1;
                p.answer(now, f, Reply::Failed);
            }
        }
        assert!((10..=20).contains(&attempts), "{attempts} attempts in 10 s");
        // An answer resets the backoff: the next failure waits the least again.
        while p.step(now, f).1.is_none() {
            now += 10_000;
        }
        let granted = Reply::Granted {
            lease: 7,
            ttl_ms: 1000,
            sent_us: now,
        };
        p.answer(now, f, granted);
        assert_eq!(
            p.step(now, f).1,
            Some(Request::Observe),
            "no wait after an answer"
        );
        p.answer(now, f, Reply::Failed);
        assert_eq!(p.step(now + RETRY_BACKOFF_MIN_US / 2 - 1, f).1, None);
        assert!(
            p.retry_at_us <= now + RETRY_BACKOFF_MIN_US,
            "the backoff restarted"
        );
    }

    #[test]
    fn the_backoff_jitter_stays_within_half_and_full() {
        for failures in 1..=40 {
            let full = RETRY_BACKOFF_MIN_US
                .saturating_mul(1 << (failures - 1).min(63))
                .min(RETRY_BACKOFF_MAX_US);
            let waits: Vec<u64> = (0..200)
                .map(|seed| retry_backoff_us(failures, seed))
                .collect();
            assert!(waits.iter().all(|w| (full / 2..=full).contains(w)));
            let distinct: std::collections::HashSet<_> = waits.iter().collect();
            assert!(distinct.len() > 50, "jittered: {} distinct", distinct.len());
        }
    }

    #[test]
    fn resigning_stops_acknowledging_and_hands_back_the_lease_once() {
        let mut p = Pilot::new("a", settings());
        run_to_leading(&mut p);
        let (acts, lease) = p.resign();
        assert_eq!(acts.first(), Some(&Action::Deadline(0)));
        assert_eq!(lease, Some(7));
        assert_eq!(p.leading(), None);
        assert_eq!(p.resign().1, None, "the lease is handed back once");
    }

    #[test]
    fn wins_an_empty_pair_and_its_deadline_is_the_grant_send_time_plus_ttl_minus_margin() {
        let mut p = Pilot::new("a", settings());
        assert_eq!(run_to_leading(&mut p), 12);
        let f = Facts {
            primary: true,
            epoch: 12,
            ..Facts::default()
        };
        let (_, r) = p.step(5_000, f);
        assert_eq!(r, Some(Request::Renew { lease: 7 }));
        let acts = p.answer(
            6_000,
            f,
            Reply::Renewed {
                ttl_ms: 1000,
                sent_us: 5_000,
            },
        );
        assert_eq!(acts, vec![Action::Deadline(805_000)]);
    }

    #[test]
    fn steps_down_at_the_deadline_without_an_answer_from_etcd() {
        let mut p = Pilot::new("a", settings());
        run_to_leading(&mut p);
        let f = Facts {
            primary: true,
            epoch: 12,
            ..Facts::default()
        };
        let (_, r) = p.step(5_000, f);
        assert!(matches!(r, Some(Request::Renew { .. })));
        // The renewal never comes back; the clock passes the deadline.
        let (acts, _) = p.step(800_000, f);
        assert_eq!(acts[0], Action::Deadline(0));
        assert!(matches!(acts[1], Action::StepDown { .. }));
        assert_eq!(p.leading(), None);
    }

    #[test]
    fn does_not_take_over_from_a_primary_that_served_alone() {
        let mut p = Pilot::new("b", settings());
        let f = Facts::default();
        p.step(0, f);
        p.answer(
            0,
            f,
            Reply::Granted {
                lease: 3,
                ttl_ms: 1000,
                sent_us: 0,
            },
        );
        p.step(0, f);
        let alone = PairState {
            leader: "a".into(),
            safety: Safety::Alone,
        };
        let acts = p.answer(
            0,
            f,
            Reply::Observed {
                leader: None,
                state: Some(alone.clone()),
            },
        );
        assert!(matches!(acts[0], Action::Warn(_)));
        assert!(
            p.step(0, f).1.is_none(),
            "no campaign before the next observation"
        );
        // An operator's promotion overrides it.
        let asked = Facts {
            promote_asked: true,
            ..f
        };
        let (_, r) = p.step(200_000, asked);
        assert_eq!(r, Some(Request::Observe));
        p.answer(
            200_000,
            asked,
            Reply::Observed {
                leader: None,
                state: Some(alone),
            },
        );
        assert!(matches!(
            p.step(200_000, asked).1,
            Some(Request::Campaign { .. })
        ));
    }

    #[test]
    fn writes_alone_before_degrading_and_sync_after_settling() {
        let mut p = Pilot::new("a", settings());
        run_to_leading(&mut p);
        let synced = Facts {
            primary: true,
            epoch: 12,
            synced: true,
            ..Facts::default()
        };
        p.step(5_000, synced);
        p.answer(
            5_000,
            synced,
            Reply::Renewed {
                ttl_ms: 1000,
                sent_us: 5_000,
            },
        );
        // Campaign wrote `alone`; synced now: first forbid degrading, then settle.
        let (acts, r) = p.step(6_000, synced);
        assert_eq!(acts, vec![Action::AllowAlone(false)]);
        assert_eq!(r, None);
        let (_, r) = p.step(200_000, synced);
        assert!(matches!(
            r,
            Some(Request::WriteState {
                state: PairState {
                    safety: Safety::Sync,
                    ..
                },
                ..
            })
        ));
        let acts = p.answer(200_000, synced, Reply::StateWritten { ok: true });
        assert_eq!(acts, vec![Action::AllowAlone(false)]);
        // The replica is lost: `alone` is written before degrading is allowed.
        let lost = Facts {
            synced: false,
            wants_alone: true,
            ..synced
        };
        let (acts, r) = p.step(210_000, lost);
        assert!(acts.is_empty());
        assert!(matches!(
            r,
            Some(Request::WriteState {
                state: PairState {
                    safety: Safety::Alone,
                    ..
                },
                ..
            })
        ));
        let acts = p.answer(211_000, lost, Reply::StateWritten { ok: true });
        assert_eq!(acts, vec![Action::AllowAlone(true)]);
    }

    #[test]
    fn another_leader_or_an_expired_lease_steps_down() {
        let mut p = Pilot::new("a", settings());
        run_to_leading(&mut p);
        let f = Facts {
            primary: true,
            epoch: 12,
            ..Facts::default()
        };
        p.step(5_000, f);
        let acts = p.answer(
            5_000,
            f,
            Reply::Renewed {
                ttl_ms: 0,
                sent_us: 5_000,
            },
        );
        assert!(matches!(
            acts.as_slice(),
            [Action::Deadline(0), Action::StepDown { .. }, ..]
        ));
    }

    #[test]
    fn does_not_campaign_while_the_cores_still_serve_a_lost_epoch() {
        let mut p = Pilot::new("a", settings());
        run_to_leading(&mut p);
        let serving = Facts {
            primary: true,
            epoch: 12,
            ..Facts::default()
        };
        // The deadline passes: step down. The cores have not yet done so
        // when the lease is gone, a new one is granted and the key is free.
        let (acts, _) = p.step(1_100_000, serving);
        assert!(matches!(acts[1], Action::StepDown { .. }));
        p.answer(1_100_000, serving, Reply::Failed);
        let (_, r) = p.step(1_200_000, serving);
        assert_eq!(r, Some(Request::Grant));
        p.answer(
            1_201_000,
            serving,
            Reply::Granted {
                lease: 8,
                ttl_ms: 1000,
                sent_us: 1_200_000,
            },
        );
        let (_, r) = p.step(1_202_000, serving);
        assert_eq!(r, Some(Request::Observe));
        let sync = PairState {
            leader: "a".into(),
            safety: Safety::Sync,
        };
        let free = Reply::Observed {
            leader: None,
            state: Some(sync.clone()),
        };
        p.answer(1_203_000, serving, free.clone());
        assert_eq!(
            p.step(1_203_000, serving).1,
            None,
            "no campaign while the cores act as primary"
        );
        // Stepped down: the next observation campaigns.
        let stepped = Facts {
            primary: false,
            ..serving
        };
        assert_eq!(p.step(1_400_000, stepped).1, Some(Request::Observe));
        p.answer(1_401_000, stepped, free);
        assert!(matches!(
            p.step(1_401_000, stepped).1,
            Some(Request::Campaign { lease: 8, .. })
        ));
    }

    #[test]
    fn a_lost_leadership_or_campaign_answer_lets_the_lease_and_its_key_expire() {
        let mut p = Pilot::new("a", settings());
        run_to_leading(&mut p);
        let f = Facts {
            primary: true,
            epoch: 12,
            ..Facts::default()
        };
        // Paused past the deadline but not past the lease's expiry in etcd:
        // renewing it would keep the leader key alive with nobody serving.
        let (acts, r) = p.step(850_000, f);
        assert!(matches!(acts[1], Action::StepDown { .. }));
        assert_eq!(r, Some(Request::Grant), "the old lease is not renewed");
        p.answer(
            851_000,
            f,
            Reply::Granted {
                lease: 8,
                ttl_ms: 1000,
                sent_us: 850_000,
            },
        );
        // A campaign whose answer is lost may have won: that lease goes too.
        let f = Facts::default();
        assert_eq!(p.step(852_000, f).1, Some(Request::Observe));
        let free = Reply::Observed {
            leader: None,
            state: None,
        };
        p.answer(853_000, f, free);
        assert!(matches!(
            p.step(853_000, f).1,
            Some(Request::Campaign { lease: 8, .. })
        ));
        p.answer(1_153_000, f, Reply::Failed);
        let retry = 1_153_000 + RETRY_BACKOFF_MIN_US; // after the backoff
        assert_eq!(p.step(retry, f).1, Some(Request::Grant));
    }

    #[test]
    fn a_state_write_without_answer_is_not_taken_as_unwritten() {
        let mut p = Pilot::new("a", settings());
        run_to_leading(&mut p);
        let synced = Facts {
            primary: true,
            epoch: 12,
            synced: true,
            ..Facts::default()
        };
        p.step(5_000, synced);
        p.answer(
            5_000,
            synced,
            Reply::Renewed {
                ttl_ms: 1000,
                sent_us: 5_000,
            },
        );
        p.step(6_000, synced); // AllowAlone(false), then settle
        let (_, r) = p.step(200_000, synced);
        assert!(matches!(r, Some(Request::WriteState { .. })));
        // `sync` may be in etcd now, but its answer is lost.
        p.answer(200_000, synced, Reply::Failed);
        let lost = Facts {
            synced: false,
            wants_alone: true,
            ..synced
        };
        let (acts, r) = p.step(200_000 + RETRY_BACKOFF_MIN_US, lost); // after the backoff
        assert!(
            !acts.contains(&Action::AllowAlone(true)),
            "degrading on a belief: {acts:?}"
        );
        assert!(matches!(
            r,
            Some(Request::WriteState {
                state: PairState {
                    safety: Safety::Alone,
                    ..
                },
                ..
            })
        ));
    }

    #[test]
    fn state_values_round_trip() {
        let s = PairState {
            leader: "p0a".into(),
            safety: Safety::Alone,
        };
        assert_eq!(PairState::decode(&s.encode()), Some(s));
        assert_eq!(PairState::decode("maybe p0a"), None);
        assert_eq!(PairState::decode("sync "), None);
    }
}
