//! A core's client connections, driven by one task. A connection is its slot
//! in the core's arena (engine::core::Slot) and nothing else: no task, no
//! poll source, no buffer while idle. The core's socket ring
//! (engine::sockets) reports which sockets became readable (or writable
//! again); the driver reads them into pooled buffers with plain nonblocking
//! `recv`, decodes and applies whole frames, keeps an incomplete frame's
//! bytes in an exactly sized copy of the connection's own (bounded per
//! core), and writes outboxes with nonblocking `send`. Work raised by other
//! tasks (an answer, a delivery, a kill) reaches it through the edge's run
//! list (`Edge::wake_slot`).

use crate::core::{precheck_send, Core, SlotState};
use crate::shard::ConnRef;
use crate::sockets::{self, Event, Io, SocketRing, Token, Watch, GENERATION_MASK};
use net::{decode_client_frame, error_code, reject_code, ClientFrame, ServerFrame};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

/// Read/flush rounds for one connection per pass before the others get a turn.
const ROUNDS_PER_PASS: usize = 8;
/// Frames decoded per round before flushing answers.
const FRAMES_PER_ROUND: usize = 256;
/// Socket completions handled per pass of the driver (the rest wait for the next pass).
const EVENTS_PER_PASS: usize = 4096;
/// After an ERROR: how long to drain the peer's unread bytes before closing,
/// so the kernel sends FIN (the peer reads the ERROR) rather than RST.
pub const LINGER_AFTER_ERROR_MS: u64 = 200;
/// Bytes drained at most during that linger.
const LINGER_DRAIN_BYTES_MAX: u32 = 1 << 20;
/// Scratch for the drain (on the stack).
const LINGER_SCRATCH_BYTES: usize = 4096;

enum Step {
    Progress,
    /// Nothing more to do until the socket (or the core) says so.
    Pending,
    /// Close now, without lingering (EOF, I/O error, killed).
    Drop,
    /// Close after the outbox is flushed (ERROR queued or BYE).
    Close,
}

enum Flush {
    Done,
    /// The socket's send buffer is full: a write poll is armed.
    Full,
    Dead,
}

/// The connection driver of one core: runs until the executor stops.
/// `bell` is the socket ring's eventfd, read through glommio.
pub async fn drive(core: Rc<RefCell<Core>>, mut ring: SocketRing, bell: glommio::io::BufferedFile) {
    let bell = Rc::new(bell);
    let mut bell_read: Option<Pin<Box<dyn Future<Output = ()>>>> = None;
    let mut events = Vec::with_capacity(EVENTS_PER_PASS);
    let mut run = Vec::new();
    let mut accepted = Vec::new();
    loop {
        std::future::poll_fn(|cx| {
            {
                let mut c = core.borrow_mut();
                if !c.edge.run.is_empty() || !c.edge.accepted.is_empty() || ring.has_events() {
                    return Poll::Ready(());
                }
                c.edge.driver_waker = Some(cx.waker().clone());
            }
            let read = bell_read.get_or_insert_with(|| {
                let bell = bell.clone();
                Box::pin(async move {
                    let _ = bell.read_at(0, 8).await;
                })
            });
            if read.as_mut().poll(cx).is_ready() {
                bell_read = None;
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        let more = {
            let mut guard = core.borrow_mut();
            let c = &mut *guard;
            std::mem::swap(&mut accepted, &mut c.edge.accepted);
            for index in accepted.drain(..) {
                let slot = c.edge.slot(index);
                if slot.state != SlotState::Free {
                    let token = Token::new(index, slot.generation, Watch::Read);
                    ring.watch_read(slot.fd, token);
                }
            }
            ring.reap(&mut events, EVENTS_PER_PASS);
            for event in events.drain(..) {
                on_event(c, &mut ring, event);
            }
            std::mem::swap(&mut run, &mut c.edge.run);
            for index in run.drain(..) {
                c.edge.slot(index).queued = false;
                service(c, &mut ring, index);
            }
            // Records appended by this pass's SENDs and ACKs share the next sync.
            c.kick_committer();
            !c.edge.run.is_empty() || !c.edge.accepted.is_empty()
        };
        ring.submit();
        if more || ring.has_events() {
            // Let the committer, the mesh and the rest run between passes.
            futures_lite::future::yield_now().await;
        }
    }
}

/// A readiness completion: the connection gets a turn.
fn on_event(c: &mut Core, ring: &mut SocketRing, event: Event) {
    let token = event.token;
    if token.watch == Watch::Cancel || token.index as usize >= c.edge.slot_count() {
        return;
    }
    let slot = c.edge.slot(token.index);
    if slot.state == SlotState::Free || slot.generation & GENERATION_MASK != token.generation {
        return; // a completion for a connection that is gone
    }
    match token.watch {
        Watch::Read => {
            if event.result == -libc::ECANCELED {
                return;
            }
            if event.result < 0 {
                slot.kill = true; // the poll failed: nothing would tell us of new bytes
            } else {
                slot.readable = true;
                if !event.more {
                    ring.watch_read(slot.fd, token); // a multishot poll the kernel ended
                }
            }
        }
        Watch::Write => slot.write_armed = false,
        Watch::Cancel => unreachable!("returned above"),
    }
    c.edge.wake_slot(token.index);
}

fn conn_ref(c: &mut Core, index: u32) -> ConnRef {
    ConnRef {
        core: c.edge.id,
        link: 0,
        slot: index,
        generation: c.edge.slot(index).generation,
    }
}

/// Gives one connection its turn: flush, read, decode, apply.
fn service(c: &mut Core, ring: &mut SocketRing, index: u32) {
    match c.edge.slot(index).state {
        SlotState::Free => return,
        SlotState::Lingering => return linger(c, ring, index),
        _ => {}
    }
    for _ in 0..ROUNDS_PER_PASS {
        let flushed = match flush(c, ring, index) {
            Flush::Done => true,
            Flush::Full => false,
            Flush::Dead => return close(c, ring, index, false),
        };
        let slot = c.edge.slot(index);
        if slot.kill {
            return close(c, ring, index, false);
        }
        if slot.state == SlotState::Closing {
            if flushed {
                close(c, ring, index, true);
            }
            return; // else the write poll brings it back
        }
        if !may_read(c, index) {
            park(c, index);
            return;
        }
        match read_and_handle(c, index) {
            Step::Progress | Step::Close => continue, // Close: flushed next round
            Step::Pending => {
                park(c, index);
                return;
            }
            Step::Drop => return close(c, ring, index, false),
        }
    }
    c.edge.wake_slot(index); // more to do: after the others had their turn
}

/// Writes the outbox as far as the socket takes it.
fn flush(c: &mut Core, ring: &mut SocketRing, index: u32) -> Flush {
    if c.edge.slot(index).tls.is_some() {
        return tls_flush(c, ring, index);
    }
    loop {
        let slot = c.edge.slot(index);
        if slot.out_sent as usize >= slot.out.len() {
            outbox_drained(c, index);
            return Flush::Done;
        }
        match sockets::send(slot.fd, &slot.out[slot.out_sent as usize..]) {
            Io::Done(n) => slot.out_sent += n as u32,
            Io::WouldBlock => {
                arm_write(ring, index, slot);
                return Flush::Full;
            }
            Io::Closed => return Flush::Dead,
        }
    }
}

fn arm_write(ring: &mut SocketRing, index: u32, slot: &mut crate::core::Slot) {
    if !slot.write_armed {
        slot.write_armed = true;
        let token = Token::new(index, slot.generation, Watch::Write);
        ring.watch_write(slot.fd, token);
    }
}

/// Gives the outbox buffer back once everything in it went out.
fn outbox_drained(c: &mut Core, index: u32) {
    let slot = c.edge.slot(index);
    slot.out_sent = 0;
    if slot.out.capacity() > 0 {
        let buf = std::mem::take(&mut slot.out);
        c.edge.give_buffer(buf);
    }
    if c.edge.slot(index).deliver_blocked_since_ms != 0 {
        c.edge.drained(index);
        c.route_edge_mail();
    }
}

/// The TLS outbox: ciphertext not yet sent goes first, then the plaintext
/// outbox is encrypted whole and sent.
fn tls_flush(c: &mut Core, ring: &mut SocketRing, index: u32) -> Flush {
    loop {
        let slot = c.edge.slot(index);
        let fd = slot.fd;
        let tls = slot.tls.as_mut().expect("a TLS slot");
        if !tls.unsent().is_empty() {
            match sockets::send(fd, tls.unsent()) {
                Io::Done(n) => tls.sent(n),
                Io::WouldBlock => {
                    arm_write(ring, index, slot);
                    return Flush::Full;
                }
                Io::Closed => return Flush::Dead,
            }
            continue;
        }
        let plain = &slot.out[slot.out_sent as usize..];
        if plain.is_empty() {
            outbox_drained(c, index);
            return Flush::Done;
        }
        match tls.pump(&mut [], &mut [], &mut 0, plain) {
            Ok(pumped) if pumped.encrypted => slot.out_sent = slot.out.len() as u32,
            // Not established (an ERROR during the handshake): nothing can be
            // said to this peer in TLS; the bytes are dropped.
            Ok(_) => slot.out_sent = slot.out.len() as u32,
            Err(e) => {
                tracing::debug!(slot = index, error = %e, "TLS failure while sending");
                return Flush::Dead;
            }
        }
    }
}

/// Back-pressure: whether to take more frames from this connection now.
fn may_read(c: &mut Core, index: u32) -> bool {
    let edge = &mut c.edge;
    if edge.shutting_down {
        return false;
    }
    if edge.mesh_full() {
        let slot = edge.slot(index);
        if !slot.waiting {
            slot.waiting = true;
            edge.mesh_waiters.push(index);
        }
        return false;
    }
    let outbox_half = edge.limits.outbox_bytes_max / 2;
    let in_flight_max = edge.limits.sends_in_flight_max;
    // An MQTT connection's PUBACKs wait for the PUBLISHes before them.
    let unanswered = edge.mqtt.unanswered(index);
    let slot = edge.slot(index);
    matches!(slot.state, SlotState::AwaitHello | SlotState::Ready)
        && slot.sends_in_flight < in_flight_max
        && unanswered < in_flight_max as usize
        && slot.out.len() - (slot.out_sent as usize) < outbox_half
}

fn read_and_handle(c: &mut Core, index: u32) -> Step {
    // Frames left over from the last round's budget come before new bytes.
    let (step, decoded) = decode_all(c, index);
    if decoded > 0 || !matches!(step, Step::Progress) {
        return step;
    }
    match read(c, index) {
        Step::Progress => decode_all(c, index).0,
        other => other,
    }
}

fn read(c: &mut Core, index: u32) -> Step {
    let edge = &mut c.edge;
    let slot = edge.slot(index);
    if !slot.readable {
        return Step::Pending;
    }
    let has_pool_buffer = slot.rbuf.is_some() && !slot.parked;
    if !has_pool_buffer {
        if !edge.read_buffer_available() {
            let slot = edge.slot(index);
            if !slot.waiting {
                slot.waiting = true;
                edge.read_waiters.push(index);
            }
            return Step::Pending;
        }
        let mut buf = edge.take_read_buffer();
        let slot = edge.slot(index);
        let mut left = 0;
        if let Some(parked) = slot.rbuf.take() {
            let bytes = &parked[slot.rstart as usize..slot.rend as usize];
            buf[..bytes.len()].copy_from_slice(bytes);
            left = bytes.len();
            slot.parked = false;
            edge.partial_frame_bytes -= parked.len();
        }
        let slot = edge.slot(index);
        slot.rbuf = Some(buf);
        (slot.rstart, slot.rend) = (0, left as u32);
    }
    let slot = edge.slot(index);
    let fd = slot.fd;
    let buf = slot.rbuf.as_mut().expect("a pool buffer");
    let (mut start, mut end) = (slot.rstart as usize, slot.rend as usize);
    if start > 0 && buf.len() - end < buf.len() / 4 {
        buf.copy_within(start..end, 0);
        (start, end) = (0, end - start);
    }
    (slot.rstart, slot.rend) = (start as u32, end as u32);
    if end == buf.len() {
        return Step::Progress; // full of whole frames not yet decoded
    }
    if slot.tls.is_some() {
        return tls_read(c, index);
    }
    let slot = c.edge.slot(index);
    let buf = slot.rbuf.as_mut().expect("a pool buffer");
    let room = buf.len() - end;
    match sockets::recv(fd, &mut buf[end..]) {
        Io::Done(n) => {
            slot.rend += n as u32;
            // A short read drained the socket: bytes that come later raise a
            // new completion of its multishot poll.
            if n < room {
                slot.readable = false;
            }
            Step::Progress
        }
        Io::WouldBlock => {
            slot.readable = false;
            Step::Pending
        }
        Io::Closed => Step::Drop,
    }
}

/// A TLS connection's read: the ciphertext of an incomplete record held
/// from last time, then what the socket has (at most what the plaintext
/// buffer has room for), decrypted into the read buffer; an incomplete
/// record's bytes are kept for next time (counted with partial frames).
fn tls_read(c: &mut Core, index: u32) -> Step {
    let (slot, scratch) = c.edge.slot_and_tls_scratch(index);
    let crate::core::Slot {
        fd,
        readable,
        rbuf,
        rend,
        tls,
        ..
    } = slot;
    let tls = tls.as_mut().expect("a TLS slot");
    if tls.closed {
        return Step::Drop;
    }
    let buf = rbuf.as_mut().expect("a pool buffer");
    let mut end = *rend as usize;
    let held = tls.pending_in.len();
    scratch[..held].copy_from_slice(&tls.pending_in);
    let room = buf.len() - end;
    let want = room.saturating_sub(held).min(scratch.len() - held);
    let mut got = 0;
    if *readable && want > 0 {
        match sockets::recv(*fd, &mut scratch[held..held + want]) {
            Io::Done(n) => {
                got = n;
                if n < want {
                    *readable = false;
                }
            }
            Io::WouldBlock => *readable = false,
            Io::Closed => return Step::Drop,
        }
    }
    if got == 0 {
        return Step::Pending; // nothing new: the held bytes are still one incomplete record
    }
    let total = held + got;
    let pumped = match tls.pump(&mut scratch[..total], buf, &mut end, &[]) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(slot = index, error = %e, "TLS failure: closing");
            return Step::Drop;
        }
    };
    *rend = end as u32;
    let left = &scratch[pumped.consumed..total];
    let was = tls.pending_in.len();
    if left.len() != was || pumped.consumed > 0 {
        tls.pending_in.clear();
        tls.pending_in.extend_from_slice(left);
        if tls.pending_in.is_empty() {
            tls.pending_in = Vec::new();
        }
    }
    let now = tls.pending_in.len();
    c.edge.partial_frame_bytes = c.edge.partial_frame_bytes + now - was;
    Step::Progress
}

/// Before the connection waits: gives the pool buffer back, keeping an
/// incomplete frame's bytes in an exactly sized allocation of the
/// connection's own, within the core's bound (past it, the buffer stays lent).
fn park(c: &mut Core, index: u32) {
    let edge = &mut c.edge;
    let slot = edge.slot(index);
    if slot.parked || slot.rbuf.is_none() {
        return;
    }
    let left = (slot.rend - slot.rstart) as usize;
    if left > 0 && edge.partial_frame_bytes + left > edge.limits.partial_frame_bytes_per_core_max {
        return; // over the core's bound: this one keeps its pool buffer
    }
    let slot = edge.slot(index);
    let buf = slot.rbuf.take().expect("checked above");
    if left > 0 {
        let range = slot.rstart as usize..slot.rend as usize;
        slot.rbuf = Some(buf[range].to_vec().into_boxed_slice());
        slot.parked = true;
    }
    (slot.rstart, slot.rend) = (0, left as u32);
    edge.partial_frame_bytes += left;
    edge.give_read_buffer(buf);
}

/// Gives the read buffer back once every byte in it was decoded.
fn release_if_drained(c: &mut Core, index: u32) {
    let edge = &mut c.edge;
    let slot = edge.slot(index);
    if slot.rstart != slot.rend {
        return;
    }
    (slot.rstart, slot.rend) = (0, 0);
    let parked = std::mem::take(&mut slot.parked);
    match slot.rbuf.take() {
        Some(bytes) if parked => edge.partial_frame_bytes -= bytes.len(),
        Some(buf) => edge.give_read_buffer(buf),
        None => {}
    }
}

/// Decodes and applies up to FRAMES_PER_ROUND buffered frames; returns how many.
fn decode_all(c: &mut Core, index: u32) -> (Step, usize) {
    if c.edge.mqtt.is_mqtt(index) {
        return decode_all_mqtt(c, index);
    }
    let limits = c.edge.net_limits;
    let slot = c.edge.slot(index);
    let Some(buf) = slot.rbuf.take() else {
        return (Step::Progress, 0);
    };
    let (mut start, end) = (slot.rstart as usize, slot.rend as usize);
    let mut step = Step::Progress;
    let mut decoded = 0;
    for _ in 0..FRAMES_PER_ROUND {
        match decode_client_frame(&buf[start..end], &limits) {
            Ok(Some((frame, used))) => {
                start += used;
                decoded += 1;
                if !handle(c, index, frame) {
                    step = Step::Close;
                    break;
                }
                if c.edge.slot(index).state != SlotState::Ready {
                    break; // AwaitWelcome pauses reading; Closing ends it
                }
            }
            Ok(None) => break,
            Err(e) => {
                c.edge.fail(index, e.error_code(), &e.to_string());
                step = Step::Close;
                break;
            }
        }
    }
    let slot = c.edge.slot(index);
    slot.rbuf = Some(buf);
    slot.rstart = start as u32;
    release_if_drained(c, index);
    (step, decoded)
}

/// `decode_all` for an MQTT connection (engine::mqtt_conn): packets instead of frames.
fn decode_all_mqtt(c: &mut Core, index: u32) -> (Step, usize) {
    let limits = c.edge.mqtt.codec;
    let slot = c.edge.slot(index);
    let Some(buf) = slot.rbuf.take() else {
        return (Step::Progress, 0);
    };
    let (mut start, end) = (slot.rstart as usize, slot.rend as usize);
    let mut step = Step::Progress;
    let mut decoded = 0;
    for _ in 0..FRAMES_PER_ROUND {
        match mqtt::decode(&buf[start..end], &limits) {
            Ok(Some((packet, used))) => {
                start += used;
                decoded += 1;
                if !crate::mqtt_conn::handle(c, index, packet) {
                    step = Step::Close;
                    break;
                }
                if c.edge.slot(index).state != SlotState::Ready {
                    break; // AwaitWelcome pauses reading; Closing ends it
                }
            }
            Ok(None) => break,
            Err(e) => {
                crate::mqtt_conn::decode_error(c, index, e);
                step = Step::Close;
                break;
            }
        }
    }
    let slot = c.edge.slot(index);
    slot.rbuf = Some(buf);
    slot.rstart = start as u32;
    release_if_drained(c, index);
    (step, decoded)
}

/// Takes one SEND from the user's token bucket (abuse limits); false: over
/// `sends_per_user_per_sec`.
pub fn take_send_token(c: &mut Core, user: &std::rc::Rc<str>) -> bool {
    let clock_ms = c.edge.clock_ms;
    let limits = c.addresses.limits();
    match c.send_buckets.get_mut(user) {
        Some(bucket) => bucket.take(limits, clock_ms),
        None => c
            .send_buckets
            .entry(user.clone())
            .or_insert_with(|| crate::abuse::Bucket::new(limits, clock_ms))
            .take(limits, clock_ms),
    }
}

/// Applies one frame. false when the connection is to be closed.
fn handle(c: &mut Core, index: u32, frame: ClientFrame<'_>) -> bool {
    let conn = conn_ref(c, index);
    let clock_ms = c.edge.clock_ms;
    let slot = c.edge.slot(index);
    slot.last_activity_ms = clock_ms;
    let state = slot.state;
    match (state, frame) {
        (
            SlotState::AwaitHello,
            ClientFrame::Hello {
                version,
                user,
                token,
            },
        ) => {
            if version != net::PROTOCOL_VERSION {
                c.edge.fail(
                    index,
                    error_code::UNSUPPORTED_VERSION,
                    "unsupported protocol version",
                );
                return false;
            }
            if let Err(e) = net::check_user_id(user, c.edge.net_limits.user_id_len_max) {
                let reason = format!("bad user id: {e}");
                c.edge.fail(index, error_code::PROTOCOL_VIOLATION, &reason);
                return false;
            }
            if let Err(why) = c.auth.check(user, token, crate::auth::now_s()) {
                let ip_key = c.edge.slot(index).ip_key;
                c.addresses.login_failed(ip_key, clock_ms);
                let interval = crate::lograte::REPEATED_ERROR_LOG_INTERVAL;
                if let Some(suppressed) = c.auth_log[why as usize].check(interval) {
                    // The reason, never the token.
                    tracing::info!(user, reason = why.label(), suppressed, "HELLO refused");
                }
                let reason = format!("authentication failed: {}", why.label());
                c.edge.fail(index, error_code::AUTH_FAILED, &reason);
                return false;
            }
            let slot = c.edge.slot(index);
            slot.user = Some(user.into());
            slot.state = SlotState::AwaitWelcome;
            c.route_login(conn, user);
            true
        }
        (SlotState::AwaitHello, _) => {
            c.edge.fail(
                index,
                error_code::PROTOCOL_VIOLATION,
                "the first frame must be HELLO",
            );
            false
        }
        (_, ClientFrame::Hello { .. }) => {
            c.edge.fail(
                index,
                error_code::PROTOCOL_VIOLATION,
                "HELLO already received",
            );
            false
        }
        (_, ClientFrame::Send { msg_id, to, body }) => {
            // A handle, not a take: a delivery made during this SEND's
            // routing may need the slot's user (to rewind its shard).
            let user = c
                .edge
                .slot(index)
                .user
                .clone()
                .expect("a Ready connection has a user");
            if !take_send_token(c, &user) {
                let reason = "sending too fast (sends_per_user_per_sec)";
                c.reject_here(index, msg_id, reject_code::RATE_LIMITED, reason);
                return true;
            }
            match precheck_send(&user, to, body.len(), &c.edge) {
                Some((code, reason)) => c.reject_here(index, msg_id, code, reason),
                None => {
                    c.edge.slot(index).sends_in_flight += 1;
                    c.edge.sends_in_flight_total += 1;
                    c.route_send(conn, &user, msg_id, to, body);
                }
            }
            true
        }
        (_, ClientFrame::Ack { seq }) => {
            let slot = c.edge.slot(index);
            if seq > slot.delivered_seq_max {
                c.edge.fail(
                    index,
                    error_code::PROTOCOL_VIOLATION,
                    "ACK of a seq not delivered",
                );
                return false;
            }
            slot.note_ack(seq);
            let user = slot.user.clone().expect("a Ready connection has a user");
            c.route_ack(&user, seq);
            true
        }
        (_, ClientFrame::Ping { nonce }) => {
            let slot = c.edge.slot(index);
            // Behind an ACK, or behind a PING still waiting for the shard
            // (PONGs keep the PINGs' order), up to the per-connection bound.
            let routed = slot.route_ping();
            match slot.user.clone().filter(|_| routed) {
                Some(user) => {
                    let conn = conn_ref(c, index);
                    c.route_sync(conn, &user, nonce);
                }
                None => {
                    c.edge.write_frame(index, &ServerFrame::Pong { nonce });
                }
            }
            true
        }
        (_, ClientFrame::Bye) => {
            c.edge.slot(index).state = SlotState::Closing;
            false
        }
    }
}

/// Ends a connection: it leaves its shard's presence; then either the socket
/// closes and the slot is freed, or (after an ERROR) FIN goes out and the
/// slot lingers, dropping what the peer still sends, until EOF or
/// `LINGER_AFTER_ERROR_MS` (`Edge::expire_lingering`).
fn close(c: &mut Core, ring: &mut SocketRing, index: u32, linger: bool) {
    let conn = conn_ref(c, index);
    crate::mqtt_conn::closed(c, index);
    let user = c.edge.slot(index).user.take();
    if let Some(user) = user {
        c.route_logout(conn, &user);
    }
    let slot = c.edge.slot(index);
    let fd = slot.fd;
    if linger {
        if let Some(tls) = slot.tls.as_mut() {
            tls.close_notify();
            if let Io::Done(n) = sockets::send(fd, tls.unsent()) {
                tls.sent(n);
            }
        }
        slot.state = SlotState::Lingering;
        slot.rstart = 0;
        slot.rend = 0;
        let parked = std::mem::take(&mut slot.parked);
        match slot.rbuf.take() {
            Some(bytes) if parked => c.edge.partial_frame_bytes -= bytes.len(),
            Some(buf) => c.edge.give_read_buffer(buf),
            None => {}
        }
        sockets::shutdown_write(fd);
        let until = c.edge.clock_ms + LINGER_AFTER_ERROR_MS;
        c.edge.lingering.push_back((index, conn.generation, until));
        c.edge.wake_slot(index); // drain what is there already
        return;
    }
    ring.unwatch(Token::new(index, conn.generation, Watch::Read));
    if slot.write_armed {
        ring.unwatch(Token::new(index, conn.generation, Watch::Write));
    }
    // io_uring holds its own reference to the file until the polls are removed.
    sockets::close(fd);
    let ip_key = slot.ip_key;
    if ip_key != 0 {
        c.addresses.release(ip_key, c.edge.clock_ms);
    }
    c.edge.release_slot(index);
}

/// A lingering connection's turn: drop what the peer sent; EOF, an error,
/// the drain bound or a kill (the linger's end) closes it.
fn linger(c: &mut Core, ring: &mut SocketRing, index: u32) {
    let slot = c.edge.slot(index);
    if slot.kill {
        return close(c, ring, index, false);
    }
    let mut scratch = [0u8; LINGER_SCRATCH_BYTES];
    while slot.readable {
        match sockets::recv(slot.fd, &mut scratch) {
            Io::Done(n) => {
                slot.rend = slot.rend.saturating_add(n as u32);
                if slot.rend >= LINGER_DRAIN_BYTES_MAX {
                    return close(c, ring, index, false);
                }
                if n < scratch.len() {
                    slot.readable = false;
                }
            }
            Io::WouldBlock => slot.readable = false,
            Io::Closed => return close(c, ring, index, false),
        }
    }
}
