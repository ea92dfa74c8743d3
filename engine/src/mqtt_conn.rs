//! MQTT 3.1.1 connections (`--mqtt-listen`, docs/MQTT.md): the same slots,
//! pool buffers, TLS, limits and shard paths as an Iris connection
//! (engine::conn), with MQTT packets on the wire instead of Iris frames.
//!
//! A CONNECT is a login check (user name = user id, password = the JWT); a
//! PUBLISH QoS 1 to `inbox/<recipient>` is a SEND whose STORED becomes the
//! PUBACK; a SUBSCRIBE to the user's own inbox is the login to its shard
//! (deliveries begin); a delivery is a PUBLISH QoS 1 whose PUBACK becomes
//! the cumulative ACK. The frames the edge writes to a connection
//! (`Edge::write_frame`) are translated here for an MQTT slot: WELCOME is the
//! CONNACK or SUBACK waiting for it, STORED a PUBACK, REJECTED a disconnect
//! (MQTT 3.1.1 has no negative PUBACK), DELIVER a PUBLISH, ERROR a
//! disconnect with the reason logged.
//!
//! Per connection, beside its slot: `MqttConn` (client id, subscription,
//! PUBLISHes awaiting STORED, deliveries awaiting PUBACK), kept in a map of
//! the core's MQTT connections only, so an Iris connection pays nothing.

use crate::core::{precheck_send, Core, Edge, SlotState, ACK_UNKNOWN};
use crate::lograte::{LogEvery, REPEATED_ERROR_LOG_INTERVAL};
use crate::mqtt_session::{self, Deliveries, Form, Sessions};
use crate::shard::ConnRef;
use mqtt::{ConnAck, Connect, ConnectReturnCode, Packet, Publish, QoS, SubAck, SubAckReturnCode};
use net::{MsgId, ServerFrame};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Bytes an MQTT packet may add to the largest Iris frame: a PUBLISH's
/// fixed header, topic (`inbox/` and a 64-byte user id) and packet id, so
/// a body of `body_len_max` fits (the read buffer has room: engine::core).
pub const PACKET_OVERHEAD_MAX: u32 = 128;

/// The MQTT side of a core's edge.
pub struct MqttEdge {
    conns: HashMap<u32, Box<MqttConn>, ahash::RandomState>,
    /// The process's sessions (shared by its cores).
    pub sessions: Arc<Sessions>,
    pub codec: mqtt::Limits,
    /// Refusals and disconnects are logged at most once per interval and
    /// kind (`Why::log_index`), with a count of the ones not logged.
    log: [LogEvery; Why::LOG_KINDS],
    topic: String,
}

impl MqttEdge {
    pub fn new(frame_len_max: u32) -> MqttEdge {
        MqttEdge {
            conns: HashMap::default(),
            sessions: Arc::new(Sessions::new(Default::default())),
            codec: mqtt::Limits {
                packet_len_max: frame_len_max + 4 + PACKET_OVERHEAD_MAX,
                ..mqtt::Limits::default()
            },
            log: Default::default(),
            topic: String::new(),
        }
    }

    /// Whether slot `index` is an MQTT connection.
    pub fn is_mqtt(&self, index: u32) -> bool {
        !self.conns.is_empty() && self.conns.contains_key(&index)
    }

    /// A connection accepted on the MQTT listener.
    pub fn open(&mut self, index: u32) {
        self.conns.insert(index, Box::default());
    }

    /// The slot was freed.
    pub fn forget(&mut self, index: u32) {
        if !self.conns.is_empty() {
            self.conns.remove(&index);
        }
    }

    /// PUBLISHes of slot `index` not yet PUBACKed (0: not MQTT).
    pub fn unanswered(&self, index: u32) -> usize {
        if self.conns.is_empty() {
            return 0;
        }
        self.conns.get(&index).map_or(0, |m| m.publishes.len())
    }

    /// Whether slot `index` is logged in to its user's shard when it has a
    /// user (every Iris connection; an MQTT one while it subscribes).
    pub fn receives(&self, index: u32) -> bool {
        if self.conns.is_empty() {
            return true;
        }
        self.conns.get(&index).is_none_or(|m| m.form.is_some())
    }

    /// The silence after which an MQTT connection is closed: 1.5 times its
    /// keep alive (MQTT 3.1.1, 3.1.2.10); None: no keep alive (the idle
    /// timeout applies) or not an MQTT connection.
    pub fn keep_alive_timeout_ms(&self, index: u32) -> Option<u64> {
        if self.conns.is_empty() {
            return None;
        }
        let ms = self.conns.get(&index)?.keep_alive_ms;
        (ms > 0).then_some(ms + ms / 2)
    }
}

/// Why an MQTT connection is refused or closed: each kind is logged apart.
#[derive(Debug, Clone, Copy)]
enum Why {
    /// CONNECT refused with a CONNACK code.
    Connect,
    /// Bytes or packets that break MQTT 3.1.1.
    Protocol,
    /// A PUBLISH Iris does not take (QoS 0 or 2, retained, not an inbox).
    Unsupported,
    /// A SUBSCRIBE filter refused (SUBACK 0x80; the connection stays).
    Subscribe,
    /// What an Iris connection gets as ERROR (idle, shutdown...).
    Error,
    /// A PUBLISH answered REJECTED with this code.
    Rejected(u16),
}

impl Why {
    const LOG_KINDS: usize = 5 + crate::stats::REJECT_CODE_MAX + 2;

    fn log_index(self) -> usize {
        match self {
            Why::Connect => 0,
            Why::Protocol => 1,
            Why::Unsupported => 2,
            Why::Subscribe => 3,
            Why::Error => 4,
            Why::Rejected(code) => 5 + crate::stats::reject_code_index(code),
        }
    }
}

/// What the next WELCOME from the user's shard answers.
#[derive(Debug, Default)]
enum Awaiting {
    #[default]
    Nothing,
    /// A persistent session resumed its subscription at CONNECT.
    ConnAck,
    SubAck {
        packet_id: u16,
        codes: Vec<SubAckReturnCode>,
    },
}

#[derive(Debug, Default)]
pub struct MqttConn {
    client_id: Box<str>,
    clean: bool,
    /// CONNECT accepted: the session is counted in the table.
    connected: bool,
    keep_alive_ms: u64,
    form: Option<Form>,
    awaiting: Awaiting,
    /// PUBLISHes not yet PUBACKed: (msg_id, packet id, STORED), in arrival
    /// order. PUBACKs go out in that order (MQTT 3.1.1 4.6), as the front
    /// ones are STORED; bounded by `sends_in_flight_max` (reading stops
    /// there: `MqttEdge::unanswered`).
    publishes: VecDeque<(MsgId, u16, bool)>,
    deliveries: Deliveries,
}

fn conn_ref(c: &mut Core, index: u32) -> ConnRef {
    ConnRef {
        core: c.edge.id,
        link: 0,
        slot: index,
        generation: c.edge.slot(index).generation,
    }
}

fn conn(edge: &mut Edge, index: u32) -> &mut MqttConn {
    edge.mqtt
        .conns
        .get_mut(&index)
        .expect("an MQTT slot has its MqttConn")
}

/// Logs why an MQTT connection is closed (rate limited) and closes it
/// after its outbox is flushed. Always false (for `handle`'s caller).
fn close_with(edge: &mut Edge, index: u32, why: Why, reason: &str) -> bool {
    let user = edge.slot(index).user.clone();
    let client_id = edge.mqtt.conns.get(&index).map(|m| m.client_id.clone());
    let log = &mut edge.mqtt.log[why.log_index()];
    if let Some(suppressed) = log.check(REPEATED_ERROR_LOG_INTERVAL) {
        tracing::info!(
            user = user.as_deref().unwrap_or(""),
            client_id = client_id.as_deref().unwrap_or(""),
            suppressed,
            "MQTT connection closed: {reason}"
        );
    }
    edge.slot(index).state = SlotState::Closing;
    edge.wake_slot(index); // the flush, then the close
    false
}

/// A CONNACK refusing the connection, then close.
fn refuse_connect(c: &mut Core, index: u32, code: ConnectReturnCode, reason: &str) -> bool {
    let connack = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
    });
    write_packet(&mut c.edge, index, &connack, false);
    close_with(
        &mut c.edge,
        index,
        Why::Connect,
        &format!("CONNECT refused (CONNACK {}): {reason}", code as u8),
    )
}

/// Appends a packet to the outbox (a delivery may not fit: false).
fn write_packet(edge: &mut Edge, index: u32, packet: &Packet<'_>, delivery: bool) -> bool {
    let len = mqtt::encoded_len(packet);
    edge.write_encoded(index, len, delivery, |out| mqtt::encode(packet, out))
}

/// A packet that is not valid MQTT 3.1.1: CONNACK 1 for an unsupported
/// protocol level, else nothing; the connection closes.
pub fn decode_error(c: &mut Core, index: u32, e: mqtt::DecodeError) {
    let first = c.edge.slot(index).state == SlotState::AwaitHello;
    match e.connack_code().filter(|_| first) {
        Some(code) => {
            refuse_connect(c, index, code, &e.to_string());
        }
        None => {
            close_with(
                &mut c.edge,
                index,
                Why::Protocol,
                &format!("protocol violation: {e}"),
            );
        }
    }
}

/// Applies one packet. false when the connection is to be closed.
pub fn handle(c: &mut Core, index: u32, packet: Packet<'_>) -> bool {
    let clock_ms = c.edge.clock_ms;
    let slot = c.edge.slot(index);
    slot.last_activity_ms = clock_ms;
    let state = slot.state;
    match (state, packet) {
        (SlotState::AwaitHello, Packet::Connect(connect)) => on_connect(c, index, &connect),
        (SlotState::AwaitHello, _) => close_with(
            &mut c.edge,
            index,
            Why::Protocol,
            "the first packet must be CONNECT",
        ),
        (_, Packet::Connect(_)) => {
            close_with(&mut c.edge, index, Why::Protocol, "a second CONNECT")
        }
        (_, Packet::Publish(publish)) => on_publish(c, index, &publish),
        (_, Packet::PubAck { packet_id }) => {
            if let Some(seq) = conn(&mut c.edge, index).deliveries.puback(packet_id) {
                let user = c.edge.slot(index).user.clone().expect("connected");
                c.route_ack(&user, seq);
                c.edge.slot(index).note_ack(seq);
            }
            true
        }
        (_, Packet::Subscribe(subscribe)) => on_subscribe(c, index, &subscribe),
        (_, Packet::Unsubscribe(unsubscribe)) => on_unsubscribe(c, index, &unsubscribe),
        (_, Packet::PingReq) => {
            // As an Iris PING (docs/DECISIONS.md 16): behind an ACK, the
            // PINGRESP waits until the ACK took effect on the user's shard.
            let slot = c.edge.slot(index);
            let routed = slot.route_ping();
            match slot.user.clone().filter(|_| routed) {
                Some(user) => {
                    let conn = conn_ref(c, index);
                    c.route_sync(conn, &user, 0);
                }
                None => {
                    write_packet(&mut c.edge, index, &Packet::PingResp, false);
                }
            }
            true
        }
        (_, Packet::Disconnect) => {
            c.edge.slot(index).state = SlotState::Closing;
            false
        }
        (_, Packet::PubRec { .. } | Packet::PubRel { .. } | Packet::PubComp { .. }) => close_with(
            &mut c.edge,
            index,
            Why::Unsupported,
            "QoS 2 is not supported (PUBREC/PUBREL/PUBCOMP)",
        ),
        (
            _,
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck { .. } | Packet::PingResp,
        ) => close_with(
            &mut c.edge,
            index,
            Why::Protocol,
            "a server's packet from a client",
        ),
    }
}

fn on_connect(c: &mut Core, index: u32, connect: &Connect<'_>) -> bool {
    use ConnectReturnCode::*;
    if connect.will.is_some() {
        // Iris publishes only what a user sends; a will would be a message
        // sent in its name after it is gone (docs/MQTT.md).
        return refuse_connect(c, index, NotAuthorized, "will messages are not supported");
    }
    let Some(user) = connect.username else {
        return refuse_connect(
            c,
            index,
            BadUserNameOrPassword,
            "no user name (the user id)",
        );
    };
    if let Err(e) = net::check_user_id(user, c.edge.net_limits.user_id_len_max) {
        let reason = format!("bad user name: {e}");
        return refuse_connect(c, index, BadUserNameOrPassword, &reason);
    }
    let sessions = c.edge.mqtt.sessions.clone();
    let client_id_len_max = sessions.limits().client_id_len_max;
    if connect.client_id.len() > client_id_len_max {
        return refuse_connect(c, index, IdentifierRejected, "client id too long");
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        return refuse_connect(
            c,
            index,
            IdentifierRejected,
            "empty client id with clean session 0",
        );
    }
    let token = connect.password.unwrap_or_default();
    if let Err(why) = c.auth.check(user, token, crate::auth::now_s()) {
        let ip_key = c.edge.slot(index).ip_key;
        c.addresses.login_failed(ip_key, c.edge.clock_ms);
        let reason = format!("authentication failed: {}", why.label());
        return refuse_connect(c, index, NotAuthorized, &reason);
    }
    let client_id: Box<str> = if connect.client_id.is_empty() {
        // Clean session with no id: one of our own, unique in the process.
        let generation = c.edge.slot(index).generation;
        format!("iris-{}-{index}-{generation}", c.edge.id).into()
    } else {
        connect.client_id.into()
    };
    let clean = connect.clean_session;
    let connected = match sessions.connect(user, &client_id, clean, c.edge.clock_ms) {
        Ok(connected) => connected,
        Err(e) => return refuse_connect(c, index, ServerUnavailable, &e.to_string()),
    };
    let keep_alive_ms = u64::from(connect.keep_alive) * 1000;
    let m = conn(&mut c.edge, index);
    (m.client_id, m.clean, m.connected, m.keep_alive_ms) = (client_id, clean, true, keep_alive_ms);
    c.edge.slot(index).user = Some(user.into());
    match connected.resume {
        Some(form) => {
            // The session's subscription: deliveries resume at once, and
            // CONNACK waits for the shard's WELCOME.
            let m = conn(&mut c.edge, index);
            m.form = Some(form);
            m.awaiting = Awaiting::ConnAck;
            c.edge.slot(index).state = SlotState::AwaitWelcome;
            let conn = conn_ref(c, index);
            c.route_login(conn, user);
        }
        None => {
            c.edge.slot(index).state = SlotState::Ready;
            let connack = Packet::ConnAck(ConnAck {
                session_present: connected.session_present,
                code: Accepted,
            });
            write_packet(&mut c.edge, index, &connack, false);
        }
    }
    true
}

fn on_publish(c: &mut Core, index: u32, p: &Publish<'_>) -> bool {
    match p.qos {
        QoS::AtLeastOnce => {}
        QoS::AtMostOnce => {
            let reason = "QoS 0 PUBLISH refused: Iris stores every message, publish with QoS 1";
            return close_with(&mut c.edge, index, Why::Unsupported, reason);
        }
        QoS::ExactlyOnce => {
            let reason =
                "QoS 2 PUBLISH refused: publish with QoS 1 (retransmissions are deduplicated)";
            return close_with(&mut c.edge, index, Why::Unsupported, reason);
        }
    }
    if p.retain {
        return close_with(
            &mut c.edge,
            index,
            Why::Unsupported,
            "retained PUBLISH refused",
        );
    }
    let Some(to) = mqtt_session::publish_recipient(p.topic) else {
        let reason = format!(
            "PUBLISH to {:?} refused: the topic must be inbox/<recipient>",
            p.topic
        );
        return close_with(&mut c.edge, index, Why::Unsupported, &reason);
    };
    let user = c.edge.slot(index).user.clone().expect("connected");
    if !crate::conn::take_send_token(c, &user) {
        c.edge.count_rejected(net::reject_code::RATE_LIMITED);
        let code = net::reject_code::RATE_LIMITED;
        let reason = "PUBLISH refused (REJECTED 3): sending too fast (sends_per_user_per_sec)";
        return close_with(&mut c.edge, index, Why::Rejected(code), reason);
    }
    if let Some((code, why)) = precheck_send(&user, to, p.payload.len(), &c.edge) {
        c.edge.count_rejected(code);
        let reason = format!("PUBLISH refused (REJECTED {code}): {why}");
        return close_with(&mut c.edge, index, Why::Rejected(code), &reason);
    }
    let client_id = conn(&mut c.edge, index).client_id.clone();
    let msg_id =
        c.edge
            .mqtt
            .sessions
            .msg_id(&user, &client_id, p.packet_id, p.dup, p.topic, p.payload);
    conn(&mut c.edge, index)
        .publishes
        .push_back((msg_id, p.packet_id, false));
    c.edge.slot(index).sends_in_flight += 1;
    c.edge.sends_in_flight_total += 1;
    let reply = conn_ref(c, index);
    c.route_send(reply, &user, msg_id, to, p.payload);
    true
}

fn on_subscribe(c: &mut Core, index: u32, s: &mqtt::Subscribe<'_>) -> bool {
    let user = c.edge.slot(index).user.clone().expect("connected");
    let mut codes = Vec::with_capacity(s.filters.len());
    let mut chosen = None;
    for f in &s.filters {
        match mqtt_session::subscription_form(f.filter, &user) {
            Some(form) => {
                // Deliveries are QoS 1 whatever was asked: QoS 0 would lose
                // them, and QoS 2 is not spoken.
                codes.push(SubAckReturnCode::Success(QoS::AtLeastOnce));
                chosen = Some(form);
            }
            None => {
                codes.push(SubAckReturnCode::Failure);
                let log = &mut c.edge.mqtt.log[Why::Subscribe.log_index()];
                if let Some(suppressed) = log.check(REPEATED_ERROR_LOG_INTERVAL) {
                    tracing::info!(user = &*user, filter = f.filter, suppressed,
                        "MQTT SUBSCRIBE refused (0x80): only inbox/<own user> and inbox/<own user>/+");
                }
            }
        }
    }
    let packet_id = s.packet_id;
    let Some(form) = chosen else {
        let suback = Packet::SubAck(SubAck {
            packet_id,
            return_codes: codes,
        });
        write_packet(&mut c.edge, index, &suback, false);
        return true;
    };
    let m = conn(&mut c.edge, index);
    let was = m.form.replace(form);
    let client_id = m.client_id.clone();
    c.edge
        .mqtt
        .sessions
        .subscribed(&user, &client_id, Some(form));
    if was.is_some() {
        // Already receiving: only the topic form changes.
        let suback = Packet::SubAck(SubAck {
            packet_id,
            return_codes: codes,
        });
        write_packet(&mut c.edge, index, &suback, false);
        return true;
    }
    // The login to the user's shard: SUBACK once it answers, then deliveries
    // from the user's last ACK (DELIVERs that were on their way before it
    // are dropped while the slot awaits the shard's WELCOME).
    restart_deliveries(&mut c.edge, index);
    conn(&mut c.edge, index).awaiting = Awaiting::SubAck { packet_id, codes };
    c.edge.slot(index).state = SlotState::AwaitWelcome;
    let conn = conn_ref(c, index);
    c.route_login(conn, &user);
    true
}

fn on_unsubscribe(c: &mut Core, index: u32, u: &mqtt::Unsubscribe<'_>) -> bool {
    let user = c.edge.slot(index).user.clone().expect("connected");
    let ours = u
        .filters
        .iter()
        .any(|f| mqtt_session::subscription_form(f, &user).is_some());
    let m = conn(&mut c.edge, index);
    if ours && m.form.is_some() {
        m.form = None;
        let client_id = m.client_id.clone();
        c.edge.mqtt.sessions.subscribed(&user, &client_id, None);
        // Deliveries stop; what is unacknowledged stays in the inbox.
        let conn = conn_ref(c, index);
        c.route_logout(conn, &user);
        restart_deliveries(&mut c.edge, index);
    }
    let unsuback = Packet::UnsubAck {
        packet_id: u.packet_id,
    };
    write_packet(&mut c.edge, index, &unsuback, false);
    true
}

/// The connection's deliveries start over (UNSUBSCRIBE, and a SUBSCRIBE that
/// logs in to the shard again): what it was sent and did not acknowledge is
/// forgotten here, so the shard's resend from the user's last ACK is written
/// again on this connection (docs/MQTT.md: it comes with the next
/// subscription). Without it the edge took those seqs for repeats
/// (`Edge::deliver_local` drops seqs up to `delivered_seq_max`) and they
/// came only on the next connection (issue 21, item 7).
fn restart_deliveries(edge: &mut Edge, index: u32) {
    conn(edge, index).deliveries.clear();
    let slot = edge.slot(index);
    let acked = slot.acked_seq();
    slot.delivered_seq_max = acked.unwrap_or(0);
    slot.ack_lag = if acked.is_some() { 0 } else { ACK_UNKNOWN };
    slot.deliver_blocked_since_ms = 0;
    slot.deliver_expected_seq = 0;
}

/// The connection closes: its session loses a connection (a clean one ends).
pub fn closed(c: &mut Core, index: u32) {
    let Some(m) = c.edge.mqtt.conns.remove(&index) else {
        return;
    };
    if m.connected {
        let user = c.edge.slot(index).user.clone().expect("connected");
        let now = c.edge.clock_ms;
        c.edge
            .mqtt
            .sessions
            .disconnected(&user, &m.client_id, m.clean, now);
    }
}

/// An Iris frame the edge writes to an MQTT connection, as MQTT. Returns
/// what `Edge::write_frame` returns: false when a delivery did not fit.
pub fn write(edge: &mut Edge, index: u32, frame: &ServerFrame<'_>) -> bool {
    match *frame {
        ServerFrame::Welcome { .. } => {
            let packet = match std::mem::take(&mut conn(edge, index).awaiting) {
                Awaiting::ConnAck => Packet::ConnAck(ConnAck {
                    session_present: true,
                    code: ConnectReturnCode::Accepted,
                }),
                Awaiting::SubAck { packet_id, codes } => Packet::SubAck(SubAck {
                    packet_id,
                    return_codes: codes,
                }),
                Awaiting::Nothing => unreachable!("a WELCOME only answers a login we sent"),
            };
            write_packet(edge, index, &packet, false)
        }
        ServerFrame::Stored { msg_id } => {
            let m = conn(edge, index);
            let entry = m
                .publishes
                .iter_mut()
                .find(|(id, _, stored)| *id == msg_id && !*stored)
                .expect("every STORED answers one PUBLISH of this connection");
            entry.2 = true;
            let mut written = true;
            while let Some(&(_, packet_id, true)) = conn(edge, index).publishes.front() {
                conn(edge, index).publishes.pop_front();
                written &= write_packet(edge, index, &Packet::PubAck { packet_id }, false);
            }
            written
        }
        ServerFrame::Rejected {
            msg_id,
            code,
            reason,
        } => {
            // No negative PUBACK in MQTT 3.1.1: the client reconnects and
            // retransmits (same msg_id, so a retry is safe).
            let m = conn(edge, index);
            let packet_id = m
                .publishes
                .iter()
                .find(|(id, _, _)| *id == msg_id)
                .map(|p| p.1);
            let reason = format!(
                "PUBLISH {} refused (REJECTED {code}): {reason}",
                packet_id.unwrap_or(0)
            );
            close_with(edge, index, Why::Rejected(code), &reason);
            true
        }
        ServerFrame::Deliver {
            seq, from, body, ..
        } => {
            let Some(form) = conn(edge, index).form else {
                // Unsubscribed: the shard is told (a rewind) and the message
                // stays in the inbox.
                return false;
            };
            let user = edge.slot(index).user.clone().expect("connected");
            let mut topic = std::mem::take(&mut edge.mqtt.topic);
            mqtt_session::delivery_topic(form, &user, from, &mut topic);
            let publish = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: &topic,
                packet_id: mqtt_session::packet_id_of(seq),
                payload: body,
            });
            let written = write_packet(edge, index, &publish, true);
            edge.mqtt.topic = topic;
            if written {
                conn(edge, index).deliveries.delivered(seq);
            }
            written
        }
        // A PINGREQ that waited for the ACKs before it.
        ServerFrame::Pong { .. } => write_packet(edge, index, &Packet::PingResp, false),
        ServerFrame::Error { reason, .. } => {
            close_with(edge, index, Why::Error, reason);
            true
        }
    }
}
