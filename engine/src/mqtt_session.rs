//! MQTT 3.1.1 sessions for the `--mqtt-listen` listener (docs/MQTT.md), the
//! parts that do no I/O: the topics Iris accepts, the node-wide session
//! table that turns a PUBLISH's packet id into a msg_id (so a retransmission
//! is deduplicated by the shards' (sender, msg_id) table), and the tracker
//! that maps a connection's PUBACKs back to inbox seqs for Iris's cumulative
//! ACK.
//!
//! The session table is shared by the cores of a process behind a few
//! mutexes (like the per-address table, engine::abuse): a client reconnects
//! on whichever core accepts it, and its retransmissions must find the
//! packet ids it used on another core. One lock per CONNECT, PUBLISH,
//! SUBSCRIBE and close, held for a lookup in a small map. `sessions_max`
//! bounds the whole table, not each lock's part: a counter shared by the
//! parts is reserved before a session is added (issue 21: 16 parts of 10
//! refused the 96th of 160 sessions).

use net::MsgId;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The limits of the MQTT listener, each with its default (`[mqtt]` in the
/// TOML file).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttLimits {
    /// Sessions (user, client id) a process remembers. Past it, the least
    /// recently used session without a connection is forgotten; when every
    /// one has a connection, CONNECT gets CONNACK 3 (server unavailable).
    pub sessions_max: usize,
    /// PUBLISH packet ids (with their msg_id) remembered per session: a
    /// retransmission of an older one gets a fresh msg_id. Clients keep far
    /// fewer in flight (mosquitto and paho: 20 by default).
    pub publish_ids_per_session_max: usize,
    /// Longest client id in bytes (CONNACK 2 past it; MQTT asks servers to
    /// allow at least 23).
    pub client_id_len_max: usize,
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            sessions_max: 100_000,
            publish_ids_per_session_max: 64,
            client_id_len_max: 128,
        }
    }
}

/// Locks the session table is split over (by a hash of the session's key).
const SESSION_SHARDS: usize = 16;

/// A subscription Iris accepts: to the subscriber's own inbox, as a plain
/// topic (payload = body) or with the sender as the last level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `inbox/<user>`: each message on that topic.
    Plain,
    /// `inbox/<user>/+`: each message on `inbox/<user>/<sender>`.
    PerSender,
}

/// The topic prefix of every Iris topic.
pub const INBOX_PREFIX: &str = "inbox/";

/// The recipient of a PUBLISH to `topic`: everything after `inbox/` (the
/// caller checks it against the user id rules). None: not an Iris topic.
pub fn publish_recipient(topic: &str) -> Option<&str> {
    topic.strip_prefix(INBOX_PREFIX).filter(|r| !r.is_empty())
}

/// Which form a SUBSCRIBE filter of `user` is, or None (refused: another
/// user's inbox, another topic, any other wildcard).
pub fn subscription_form(filter: &str, user: &str) -> Option<Form> {
    let own = filter.strip_prefix(INBOX_PREFIX)?.strip_prefix(user)?;
    match own {
        "" => Some(Form::Plain),
        "/+" => Some(Form::PerSender),
        _ => None,
    }
}

/// The topic a delivery to `user` from `from` goes out on, in `form`.
pub fn delivery_topic(form: Form, user: &str, from: &str, out: &mut String) {
    out.clear();
    out.push_str(INBOX_PREFIX);
    out.push_str(user);
    if form == Form::PerSender {
        out.push('/');
        out.push_str(from);
    }
}

/// One remembered PUBLISH of a session: its packet id, a fingerprint of its
/// topic and payload, and the msg_id it was sent to the shard with.
#[derive(Debug, Clone, Copy)]
struct Published {
    packet_id: u16,
    fingerprint: u64,
    msg_id: MsgId,
}

#[derive(Debug)]
struct Session {
    /// Oldest first; at most `publish_ids_per_session_max`, one per packet id.
    published: VecDeque<Published>,
    /// The subscription a persistent session resumes with (clean session 0).
    form: Option<Form>,
    /// Connections using this session now (never evicted while > 0).
    connections: u32,
    last_used_ms: u64,
}

impl Session {
    /// Another connection uses this existing session. A clean one starts
    /// over (another connection may still use it).
    fn join(&mut self, clean: bool, now_ms: u64) -> Connected {
        if clean {
            self.published.clear();
            self.form = None;
        }
        self.connections += 1;
        self.last_used_ms = now_ms;
        Connected {
            session_present: !clean,
            resume: if clean { None } else { self.form },
        }
    }
}

/// What CONNECT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    /// CONNACK's session present: a persistent session this process kept.
    pub session_present: bool,
    /// Its subscription, to resume at once.
    pub resume: Option<Form>,
}

/// Every session is in use and the table is at `sessions_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("MQTT session table full (mqtt sessions_max)")]
pub struct SessionsFull;

type Key = (Box<str>, Box<str>);

/// The node's MQTT sessions, keyed by (user, client id): a client id names
/// a device of one user, so two users' devices never share a session.
pub struct Sessions {
    shards: Vec<Mutex<HashMap<Key, Session>>>,
    /// Sessions in all shards, plus those being added (reserved, not yet
    /// inserted): never above `sessions_max`.
    count: AtomicUsize,
    hasher: ahash::RandomState,
    limits: MqttLimits,
}

impl Sessions {
    pub fn new(limits: MqttLimits) -> Sessions {
        assert!(limits.sessions_max > 0 && limits.publish_ids_per_session_max > 0);
        Sessions {
            shards: (0..SESSION_SHARDS).map(|_| Mutex::default()).collect(),
            count: AtomicUsize::new(0),
            hasher: ahash::RandomState::new(),
            limits,
        }
    }

    pub fn limits(&self) -> &MqttLimits {
        &self.limits
    }

    fn shard_index(&self, user: &str, client_id: &str) -> usize {
        let h = self.hasher.hash_one((user, client_id));
        h as usize % SESSION_SHARDS
    }

    fn with_shard<R>(&self, index: usize, f: impl FnOnce(&mut HashMap<Key, Session>) -> R) -> R {
        // A poisoned lock means a panic elsewhere, which ends the process.
        let mut map = self.shards[index].lock().expect("session table lock");
        f(&mut map)
    }

    fn with<R>(
        &self,
        user: &str,
        client_id: &str,
        f: impl FnOnce(&mut HashMap<Key, Session>) -> R,
    ) -> R {
        self.with_shard(self.shard_index(user, client_id), f)
    }

    /// Room for one more session in the table: Ok once counted, after
    /// forgetting an idle session if the table is at `sessions_max`;
    /// SessionsFull when every session has a connection.
    fn reserve(&self) -> Result<(), SessionsFull> {
        let max = self.limits.sessions_max;
        loop {
            let n = self.count.load(Ordering::Acquire);
            if n < max {
                if self
                    .count
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if !self.evict_idle() {
                return Err(SessionsFull);
            }
        }
    }

    /// Forgets the least recently used session without a connection in the
    /// whole table; false: every session has one. One lock at a time, never
    /// two: the parts are searched in turn, then the oldest one's part is
    /// locked again to remove it if it is still idle and unused (if not,
    /// true all the same: the caller looks again). A scan of the table, on
    /// a CONNECT that finds it full only.
    fn evict_idle(&self) -> bool {
        let mut oldest: Option<(usize, u64, Key)> = None;
        for index in 0..SESSION_SHARDS {
            self.with_shard(index, |map| {
                let idle = map
                    .iter()
                    .filter(|(_, s)| s.connections == 0)
                    .min_by_key(|(_, s)| s.last_used_ms);
                if let Some((key, s)) = idle {
                    if oldest.as_ref().is_none_or(|o| s.last_used_ms < o.1) {
                        oldest = Some((index, s.last_used_ms, key.clone()));
                    }
                }
            });
        }
        let Some((index, last_used_ms, key)) = oldest else {
            return false;
        };
        self.with_shard(index, |map| {
            let unchanged = map
                .get(&key)
                .is_some_and(|s| s.connections == 0 && s.last_used_ms == last_used_ms);
            if unchanged {
                map.remove(&key);
                self.count.fetch_sub(1, Ordering::AcqRel);
            }
        });
        true
    }

    /// A connection of `user` with `client_id` opened its session. A clean
    /// session starts empty (and ends with its last connection); a
    /// persistent one is resumed if this process has it.
    pub fn connect(
        &self,
        user: &str,
        client_id: &str,
        clean: bool,
        now_ms: u64,
    ) -> Result<Connected, SessionsFull> {
        let index = self.shard_index(user, client_id);
        let key: Key = (user.into(), client_id.into());
        if let Some(found) = self.with_shard(index, |map| {
            map.get_mut(&key).map(|s| s.join(clean, now_ms))
        }) {
            return Ok(found);
        }
        // A new session: counted first (no lock held while another part of
        // the table may be searched for an idle session to forget).
        self.reserve()?;
        self.with_shard(index, |map| {
            if let Some(s) = map.get_mut(&key) {
                // Another connection added it meanwhile: join it, and give
                // the reservation back.
                self.count.fetch_sub(1, Ordering::AcqRel);
                return Ok(s.join(clean, now_ms));
            }
            map.insert(
                key,
                Session {
                    published: VecDeque::new(),
                    form: None,
                    connections: 1,
                    last_used_ms: now_ms,
                },
            );
            Ok(Connected {
                session_present: false,
                resume: None,
            })
        })
    }

    /// The msg_id of a QoS 1 PUBLISH (docs/MQTT.md, "msg_id"): a
    /// retransmission (DUP 1) of the session's last PUBLISH with this packet
    /// id and the same topic and payload gets that PUBLISH's msg_id; any
    /// other PUBLISH a fresh one, remembered under its packet id.
    pub fn msg_id(
        &self,
        user: &str,
        client_id: &str,
        packet_id: u16,
        dup: bool,
        topic: &str,
        payload: &[u8],
    ) -> MsgId {
        let fingerprint = {
            let mut h = self.hasher.build_hasher();
            topic.hash(&mut h);
            payload.hash(&mut h);
            h.finish()
        };
        let ids_max = self.limits.publish_ids_per_session_max;
        self.with(user, client_id, |map| {
            let key: Key = (user.into(), client_id.into());
            let Some(s) = map.get_mut(&key) else {
                // Only a connected session publishes, and it is never evicted.
                unreachable!("PUBLISH on a session that is not in the table")
            };
            let at = s.published.iter().position(|p| p.packet_id == packet_id);
            if let Some(p) = at.map(|i| s.published[i]) {
                if dup && p.fingerprint == fingerprint {
                    return p.msg_id;
                }
            }
            if let Some(i) = at {
                s.published.remove(i);
            }
            if s.published.len() >= ids_max {
                s.published.pop_front();
            }
            let msg_id = net::client::new_msg_id();
            s.published.push_back(Published {
                packet_id,
                fingerprint,
                msg_id,
            });
            msg_id
        })
    }

    /// The subscription a persistent session resumes with.
    pub fn subscribed(&self, user: &str, client_id: &str, form: Option<Form>) {
        self.with(user, client_id, |map| {
            let key: Key = (user.into(), client_id.into());
            if let Some(s) = map.get_mut(&key) {
                s.form = form;
            }
        });
    }

    /// A connection of the session closed; a clean session ends with its
    /// last connection.
    pub fn disconnected(&self, user: &str, client_id: &str, clean: bool, now_ms: u64) {
        self.with(user, client_id, |map| {
            let key: Key = (user.into(), client_id.into());
            let Some(s) = map.get_mut(&key) else {
                unreachable!("a connected session is never evicted")
            };
            s.connections -= 1;
            s.last_used_ms = now_ms;
            if clean && s.connections == 0 {
                map.remove(&key);
                self.count.fetch_sub(1, Ordering::AcqRel);
            }
        });
    }

    /// Sessions held now (all shards).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The packet id a delivery of inbox seq `seq` goes out with: seqs modulo
/// 65535, skipping 0. A connection never has more than `deliver_window`
/// (< 65535) deliveries unacknowledged, so ids in flight never collide.
pub fn packet_id_of(seq: u64) -> u16 {
    assert!(seq > 0, "inbox seqs start at 1");
    ((seq - 1) % 65535 + 1) as u16
}

/// Deliveries beyond this many unacknowledged on one connection would reuse
/// a packet id still in flight.
pub const DELIVERIES_IN_FLIGHT_MAX: usize = 65534;

/// A connection's deliveries not yet acknowledged, in seq order: turns the
/// client's PUBACKs (any order) into Iris's cumulative ACK.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// (seq, PUBACK received), oldest first; bounded by the shard's
    /// delivery window.
    in_flight: VecDeque<(u64, bool)>,
}

impl Deliveries {
    /// A delivery of `seq` was written to the connection (seqs grow).
    pub fn delivered(&mut self, seq: u64) {
        if let Some(&(last, _)) = self.in_flight.back() {
            assert!(seq > last, "deliveries on a connection go in seq order");
        }
        assert!(
            self.in_flight.len() < DELIVERIES_IN_FLIGHT_MAX,
            "more deliveries in flight than packet ids (deliver_window < 65535 is checked at start)"
        );
        self.in_flight.push_back((seq, false));
    }

    /// The client acknowledged `packet_id`. Some(seq): every delivery up to
    /// seq is acknowledged now (the ACK to send); None: nothing new
    /// (an earlier one is still unacknowledged, or the id is not in flight:
    /// a repeated PUBACK, or one for a delivery dropped by an UNSUBSCRIBE).
    pub fn puback(&mut self, packet_id: u16) -> Option<u64> {
        let entry = self
            .in_flight
            .iter_mut()
            .find(|(seq, acked)| !*acked && packet_id_of(*seq) == packet_id)?;
        entry.1 = true;
        let mut cumulative = None;
        while let Some(&(seq, true)) = self.in_flight.front() {
            cumulative = Some(seq);
            self.in_flight.pop_front();
        }
        if self.in_flight.is_empty() && self.in_flight.capacity() > 64 {
            self.in_flight = VecDeque::new(); // an idle connection holds nothing
        }
        cumulative
    }

    /// Forgets everything in flight (after an UNSUBSCRIBE): those messages
    /// stay in the inbox and come again with the next subscription.
    pub fn clear(&mut self) {
        self.in_flight = VecDeque::new();
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(ids: usize, max: usize) -> Sessions {
        Sessions::new(MqttLimits {
            sessions_max: max,
            publish_ids_per_session_max: ids,
            client_id_len_max: 64,
        })
    }

    #[test]
    fn topics() {
        assert_eq!(publish_recipient("inbox/bob"), Some("bob"));
        assert_eq!(publish_recipient("inbox/"), None);
        assert_eq!(publish_recipient("outbox/bob"), None);
        assert_eq!(subscription_form("inbox/bob", "bob"), Some(Form::Plain));
        assert_eq!(
            subscription_form("inbox/bob/+", "bob"),
            Some(Form::PerSender)
        );
        assert_eq!(subscription_form("inbox/bob/#", "bob"), None);
        assert_eq!(subscription_form("inbox/+", "bob"), None);
        assert_eq!(subscription_form("inbox/bobby", "bob"), None);
        assert_eq!(subscription_form("inbox/alice", "bob"), None);
        assert_eq!(subscription_form("#", "bob"), None);
        let mut t = String::new();
        delivery_topic(Form::PerSender, "bob", "alice", &mut t);
        assert_eq!(t, "inbox/bob/alice");
        delivery_topic(Form::Plain, "bob", "alice", &mut t);
        assert_eq!(t, "inbox/bob");
    }

    #[test]
    fn a_retransmission_gets_the_original_msg_id_and_a_reused_packet_id_a_fresh_one() {
        let s = sessions(64, 100);
        s.connect("alice", "phone", false, 1).unwrap();
        let first = s.msg_id("alice", "phone", 1, false, "inbox/bob", b"hi");
        // Retransmitted (DUP) with the same packet id and content: deduplicated.
        assert_eq!(
            s.msg_id("alice", "phone", 1, true, "inbox/bob", b"hi"),
            first
        );
        // Packet id 1 reused after its PUBACK (mosquitto_pub does it every
        // run), same content: a new message.
        let second = s.msg_id("alice", "phone", 1, false, "inbox/bob", b"hi");
        assert_ne!(second, first);
        assert_eq!(
            s.msg_id("alice", "phone", 1, true, "inbox/bob", b"hi"),
            second
        );
        // A DUP whose first transmission never arrived (other content): fresh.
        let third = s.msg_id("alice", "phone", 1, true, "inbox/bob", b"other");
        assert_ne!(third, second);
        // Another device of the same user, or another user, shares nothing.
        s.connect("alice", "laptop", false, 1).unwrap();
        assert_ne!(
            s.msg_id("alice", "laptop", 1, true, "inbox/bob", b"other"),
            third
        );
    }

    #[test]
    fn a_persistent_session_survives_its_connection_and_a_clean_one_does_not() {
        let s = sessions(64, 100);
        let c = s.connect("bob", "phone", false, 1).unwrap();
        assert_eq!(
            c,
            Connected {
                session_present: false,
                resume: None
            }
        );
        let id = s.msg_id("bob", "phone", 7, false, "inbox/alice", b"x");
        s.subscribed("bob", "phone", Some(Form::PerSender));
        s.disconnected("bob", "phone", false, 2);
        let c = s.connect("bob", "phone", false, 3).unwrap();
        assert_eq!(
            c,
            Connected {
                session_present: true,
                resume: Some(Form::PerSender)
            }
        );
        // The retransmission after the reconnect is the same message.
        assert_eq!(s.msg_id("bob", "phone", 7, true, "inbox/alice", b"x"), id);
        s.disconnected("bob", "phone", false, 4);
        // Clean session: starts empty and is gone after.
        let c = s.connect("bob", "phone", true, 5).unwrap();
        assert_eq!(
            c,
            Connected {
                session_present: false,
                resume: None
            }
        );
        assert_ne!(s.msg_id("bob", "phone", 7, true, "inbox/alice", b"x"), id);
        s.disconnected("bob", "phone", true, 6);
        assert!(s.is_empty());
    }

    #[test]
    fn packet_ids_per_session_are_bounded_oldest_forgotten() {
        let s = sessions(2, 100);
        s.connect("a", "c", false, 1).unwrap();
        let one = s.msg_id("a", "c", 1, false, "inbox/b", b"1");
        let two = s.msg_id("a", "c", 2, false, "inbox/b", b"2");
        s.msg_id("a", "c", 3, false, "inbox/b", b"3");
        assert_eq!(s.msg_id("a", "c", 2, true, "inbox/b", b"2"), two);
        assert_ne!(s.msg_id("a", "c", 1, true, "inbox/b", b"1"), one);
    }

    /// `sessions_max` is the whole table's bound, exactly (issue 21, item
    /// 7): 160 live sessions fit in a table of 160, the 161st is refused.
    /// Red with the per-lock bound planted back (`sessions_max / 16` per
    /// lock, as before): a session was refused before the 160th.
    #[test]
    fn sessions_are_bounded_exactly_idle_ones_evicted_first_then_refused() {
        const MAX: usize = 160;
        let s = sessions(4, MAX);
        for i in 0..MAX {
            let client = format!("c{i}");
            assert_eq!(
                s.connect("u", &client, false, i as u64)
                    .map(|c| c.session_present),
                Ok(false),
                "session {} of {MAX}",
                i + 1
            );
        }
        assert_eq!(s.len(), MAX);
        assert_eq!(s.connect("u", "one-more", false, 500), Err(SessionsFull));
        // Joining a session the table holds needs no room.
        assert!(s.connect("u", "c7", false, 501).is_ok());
        assert_eq!(s.len(), MAX);
        // Once some closed, the least recently used idle one is forgotten.
        s.disconnected("u", "c3", false, 600);
        s.disconnected("u", "c4", false, 601);
        assert!(s.connect("u", "one-more", false, 700).is_ok());
        assert_eq!(s.len(), MAX);
        assert_eq!(
            s.connect("u", "c4", false, 701).map(|c| c.session_present),
            Ok(true),
            "the more recently used idle session is kept while c3's was idle"
        );
        let refused = s.connect("u", "two-more", false, 702);
        assert_eq!(refused, Err(SessionsFull));
        // A clean session gives its room back when it closes.
        s.disconnected("u", "c5", false, 800);
        assert!(s.connect("u", "clean", true, 801).is_ok());
        s.disconnected("u", "clean", true, 802);
        assert_eq!(s.len(), MAX - 1);
        assert!(s.connect("u", "two-more", false, 803).is_ok());
        assert_eq!(s.len(), MAX);
    }

    /// The count and the table agree under CONNECTs and closes from many
    /// threads (the cores), and the bound is never passed.
    #[test]
    fn the_bound_holds_across_threads() {
        const MAX: usize = 100;
        let s = std::sync::Arc::new(sessions(4, MAX));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut held = 0;
                    for i in 0..200u64 {
                        let client = format!("t{t}-{i}");
                        if s.connect("u", &client, false, i).is_ok() {
                            held += 1;
                            assert!(s.len() <= MAX);
                            if i % 3 == 0 {
                                s.disconnected("u", &client, false, i);
                            }
                        }
                    }
                    held
                })
            })
            .collect();
        let held: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(held >= MAX, "{held}");
        let in_table: usize = s.shards.iter().map(|m| m.lock().unwrap().len()).sum();
        assert_eq!(in_table, s.len());
        assert_eq!(s.len(), MAX);
    }

    #[test]
    fn pubacks_in_any_order_give_the_cumulative_ack() {
        let mut d = Deliveries::default();
        for seq in 5..=8 {
            d.delivered(seq);
        }
        assert_eq!(d.puback(packet_id_of(6)), None); // 5 still unacknowledged
        assert_eq!(d.puback(packet_id_of(6)), None); // repeated
        assert_eq!(d.puback(packet_id_of(5)), Some(6));
        assert_eq!(d.puback(999), None); // not in flight
        assert_eq!(d.puback(packet_id_of(8)), None);
        assert_eq!(d.puback(packet_id_of(7)), Some(8));
        assert!(d.is_empty());
    }

    #[test]
    fn packet_ids_wrap_past_65535_and_skip_zero() {
        assert_eq!(packet_id_of(1), 1);
        assert_eq!(packet_id_of(65535), 65535);
        assert_eq!(packet_id_of(65536), 1);
        let mut d = Deliveries::default();
        d.delivered(65535);
        d.delivered(65536);
        assert_eq!(d.puback(1), None);
        assert_eq!(d.puback(65535), Some(65536));
    }
}
