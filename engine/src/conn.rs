//! One client connection: a single future that flushes the connection's
//! outbox, reads and decodes frames, and hands them to the core. It holds no
//! read buffer while the connection is idle: it waits on a small inline buffer
//! and borrows a pooled buffer only while bytes are there to decode.

use crate::core::{precheck_send, Core, SlotState};
use crate::shard::ConnRef;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use net::{decode_client_frame, error_code, ClientFrame, ServerFrame};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Read/flush rounds per poll before yielding to other tasks (fairness).
const ROUNDS_PER_POLL: usize = 8;
/// Frames decoded per round before flushing answers.
const FRAMES_PER_ROUND: usize = 256;
/// After an ERROR: how long to drain the peer's unread bytes before closing,
/// so the kernel sends FIN (the peer reads the ERROR) rather than RST.
const LINGER_AFTER_ERROR: Duration = Duration::from_millis(200);
/// Bytes drained at most during that linger.
const LINGER_DRAIN_BYTES_MAX: usize = 1 << 20;
/// Where an idle connection waits for its first bytes (lives in the future).
const INLINE_READ_LEN: usize = 16;

enum Step {
    Progress,
    Pending,
    /// Close now, without lingering (EOF, I/O error, killed).
    Drop,
    /// Close after the outbox is flushed (ERROR queued or BYE).
    Close,
}

struct Conn {
    core: Rc<RefCell<Core>>,
    index: u32,
    generation: u32,
    stream: TcpStream,
    inline: [u8; INLINE_READ_LEN],
    /// Borrowed from the core's read pool only while bytes are being decoded;
    /// while the connection waits with an incomplete frame, `parked`: an
    /// exactly sized copy of those bytes (counted in
    /// `Edge::partial_frame_bytes`), so a slow or hostile peer holds what it
    /// sent, never a pool buffer.
    rbuf: Option<Box<[u8]>>,
    parked: bool,
    rstart: usize,
    rend: usize,
}

/// The task of one connection. A hand-written future, so an idle connection
/// costs exactly a `Conn` (no generator copies of its arguments, no close-time
/// state): the drain after an ERROR is boxed only when it happens.
pub struct ConnTask {
    conn: Option<Conn>,
    linger: Option<Pin<Box<dyn Future<Output = ()>>>>,
}

/// The per-connection task's state (glommio adds its task header): measured
/// idle connections cost about 1.3 KB in all, so this must not grow unnoticed.
pub const CONN_TASK_BYTES_MAX: usize = 208;
const _: () = assert!(std::mem::size_of::<ConnTask>() <= CONN_TASK_BYTES_MAX);

pub fn serve(core: Rc<RefCell<Core>>, index: u32, generation: u32, stream: TcpStream) -> ConnTask {
    // TCP_NODELAY: answers are small and latency-bound; batching is done per turn.
    let _ = stream.set_nodelay(true);
    let conn = Conn {
        core,
        index,
        generation,
        stream,
        inline: [0; INLINE_READ_LEN],
        rbuf: None,
        parked: false,
        rstart: 0,
        rend: 0,
    };
    ConnTask {
        conn: Some(conn),
        linger: None,
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(linger) = this.linger.as_mut() {
            return linger.as_mut().poll(cx);
        }
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(());
        };
        let Poll::Ready(linger) = conn.poll(cx) else {
            return Poll::Pending;
        };
        let mut conn = this.conn.take().expect("present");
        conn.release();
        if !linger {
            return Poll::Ready(());
        }
        let linger = this.linger.insert(Box::pin(linger_close(conn.stream)));
        linger.as_mut().poll(cx)
    }
}

/// After an ERROR: FIN, then drain what the peer still sends for a moment, so
/// the kernel does not answer with RST (which could destroy the unread ERROR).
async fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let drain = async {
        let mut scratch = vec![0u8; 512];
        let mut drained = 0;
        while drained < LINGER_DRAIN_BYTES_MAX {
            match futures_lite::AsyncReadExt::read(&mut stream, &mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    futures_lite::future::or(drain, glommio::timer::sleep(LINGER_AFTER_ERROR)).await;
}

impl Conn {
    fn conn_ref(&self, core_id: u16) -> ConnRef {
        ConnRef {
            core: core_id,
            slot: self.index,
            generation: self.generation,
        }
    }

    /// Drives the connection; Ready(linger) when it must close.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let core_rc = self.core.clone();
        let mut core = core_rc.borrow_mut();
        for _ in 0..ROUNDS_PER_POLL {
            let flushed = match self.flush(&mut core, cx) {
                Some(done) => done,
                None => return Poll::Ready(false),
            };
            let slot = core.edge.slot(self.index);
            if slot.kill {
                return Poll::Ready(false);
            }
            if slot.state == SlotState::Closing {
                if flushed {
                    return Poll::Ready(true);
                }
                slot.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if !self.may_read(&mut core, cx) {
                self.park(&mut core);
                core.edge.slot(self.index).waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            match self.read_and_handle(&mut core, cx) {
                Step::Progress => continue,
                Step::Pending => {
                    self.park(&mut core);
                    core.edge.slot(self.index).waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Step::Drop => return Poll::Ready(false),
                Step::Close => continue, // flushed at the top of the next round
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes the outbox. Some(true) when empty, Some(false) when the socket is
    /// full, None when the connection is dead.
    fn flush(&mut self, core: &mut Core, cx: &mut Context<'_>) -> Option<bool> {
        loop {
            let slot = core.edge.slot(self.index);
            if slot.out_sent >= slot.out.len() {
                if slot.out.capacity() > 0 {
                    let buf = std::mem::take(&mut slot.out);
                    slot.out_sent = 0;
                    core.edge.give_buffer(buf);
                }
                if core
                    .edge
                    .slot(self.index)
                    .deliver_blocked_since_ms
                    .is_some()
                {
                    core.edge.drained(self.index);
                    core.route_edge_mail();
                }
                return Some(true);
            }
            match Pin::new(&mut self.stream).poll_write(cx, &slot.out[slot.out_sent..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return None,
                Poll::Ready(Ok(n)) => slot.out_sent += n,
                Poll::Pending => return Some(false),
            }
        }
    }

    /// Back-pressure: whether to read more from this connection now.
    fn may_read(&mut self, core: &mut Core, cx: &mut Context<'_>) -> bool {
        let edge = &mut core.edge;
        if edge.shutting_down {
            return false;
        }
        if edge.mesh_full() {
            edge.mesh_waiters.push(cx.waker().clone());
            return false;
        }
        let outbox_half = edge.limits.outbox_bytes_max / 2;
        let in_flight_max = edge.limits.sends_in_flight_max;
        let has_buffer = self.rbuf.is_some() && !self.parked;
        if !has_buffer && !edge.read_buffer_available() {
            edge.read_waiters.push(cx.waker().clone());
            return false;
        }
        let slot = edge.slot(self.index);
        matches!(slot.state, SlotState::AwaitHello | SlotState::Ready)
            && slot.sends_in_flight < in_flight_max
            && slot.out.len() - slot.out_sent < outbox_half
    }

    fn read_and_handle(&mut self, core: &mut Core, cx: &mut Context<'_>) -> Step {
        // Frames left over from the last round's budget come before new bytes.
        let (step, decoded) = self.decode_all(core);
        if decoded > 0 || !matches!(step, Step::Progress) {
            core.kick_committer();
            return step;
        }
        let step = match self.read(core, cx) {
            Step::Progress => self.decode_all(core).0,
            other => other,
        };
        // Records appended by local SENDs/ACKs this round share the next sync.
        core.kick_committer();
        step
    }

    fn read(&mut self, core: &mut Core, cx: &mut Context<'_>) -> Step {
        if self.parked {
            self.unpark(core);
        }
        let Some(buf) = self.rbuf.as_mut() else {
            return match Pin::new(&mut self.stream).poll_read(cx, &mut self.inline) {
                Poll::Pending => Step::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Step::Drop,
                Poll::Ready(Ok(n)) => {
                    let mut buf = core.edge.take_read_buffer();
                    buf[..n].copy_from_slice(&self.inline[..n]);
                    self.rbuf = Some(buf);
                    (self.rstart, self.rend) = (0, n);
                    Step::Progress
                }
            };
        };
        if self.rstart > 0 && buf.len() - self.rend < buf.len() / 4 {
            buf.copy_within(self.rstart..self.rend, 0);
            (self.rstart, self.rend) = (0, self.rend - self.rstart);
        }
        if self.rend == buf.len() {
            return Step::Progress; // full of whole frames not yet decoded
        }
        match Pin::new(&mut self.stream).poll_read(cx, &mut buf[self.rend..]) {
            Poll::Pending => {
                self.release_if_drained(core);
                Step::Pending
            }
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Step::Drop,
            Poll::Ready(Ok(n)) => {
                self.rend += n;
                Step::Progress
            }
        }
    }

    /// Before waiting: gives the pool buffer back, keeping an incomplete
    /// frame's bytes in an exactly sized allocation of the connection's own,
    /// within the core's bound (past it, the buffer stays lent).
    fn park(&mut self, core: &mut Core) {
        if self.parked {
            return;
        }
        let Some(buf) = self.rbuf.as_ref() else {
            return;
        };
        let left = self.rend - self.rstart;
        let edge = &mut core.edge;
        if left > 0
            && edge.partial_frame_bytes + left > edge.limits.partial_frame_bytes_per_core_max
        {
            return; // over the core's bound: this one keeps its pool buffer
        }
        let parked: Option<Box<[u8]>> =
            (left > 0).then(|| buf[self.rstart..self.rend].to_vec().into_boxed_slice());
        let buf = std::mem::replace(&mut self.rbuf, parked).expect("checked above");
        edge.give_read_buffer(buf);
        edge.partial_frame_bytes += left;
        self.parked = left > 0;
        (self.rstart, self.rend) = (0, left);
    }

    /// The parked bytes go back into a pool buffer (the caller checked one is free).
    fn unpark(&mut self, core: &mut Core) {
        let parked = self.rbuf.take().expect("parked bytes");
        core.edge.partial_frame_bytes -= parked.len();
        let left = &parked[self.rstart..self.rend];
        let mut buf = core.edge.take_read_buffer();
        buf[..left.len()].copy_from_slice(left);
        self.rbuf = Some(buf);
        self.parked = false;
        (self.rstart, self.rend) = (0, left.len());
    }

    fn release_if_drained(&mut self, core: &mut Core) {
        if self.rstart == self.rend {
            if let Some(buf) = self.rbuf.take() {
                if self.parked {
                    core.edge.partial_frame_bytes -= buf.len();
                    self.parked = false;
                } else {
                    core.edge.give_read_buffer(buf);
                }
            }
            (self.rstart, self.rend) = (0, 0);
        }
    }

    /// Decodes and applies up to FRAMES_PER_ROUND buffered frames; returns how many.
    fn decode_all(&mut self, core: &mut Core) -> (Step, usize) {
        let limits = core.edge.net_limits;
        let Some(buf) = self.rbuf.take() else {
            return (Step::Progress, 0);
        };
        let mut step = Step::Progress;
        let mut decoded = 0;
        for _ in 0..FRAMES_PER_ROUND {
            match decode_client_frame(&buf[self.rstart..self.rend], &limits) {
                Ok(Some((frame, used))) => {
                    self.rstart += used;
                    decoded += 1;
                    if !self.handle(core, frame) {
                        step = Step::Close;
                        break;
                    }
                    let state = core.edge.slot(self.index).state;
                    if state != SlotState::Ready {
                        break; // AwaitWelcome pauses reading; Closing ends it
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    core.edge.fail(self.index, e.error_code(), &e.to_string());
                    step = Step::Close;
                    break;
                }
            }
        }
        self.rbuf = Some(buf);
        self.release_if_drained(core);
        (step, decoded)
    }

    /// Applies one frame. false when the connection is to be closed.
    fn handle(&mut self, core: &mut Core, frame: ClientFrame<'_>) -> bool {
        let index = self.index;
        let conn = self.conn_ref(core.edge.id);
        let clock_ms = core.edge.clock_ms;
        let slot = core.edge.slot(index);
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
                    core.edge.fail(
                        index,
                        error_code::UNSUPPORTED_VERSION,
                        "unsupported protocol version",
                    );
                    return false;
                }
                if !net::valid_user_id(user, &core.edge.net_limits) {
                    core.edge
                        .fail(index, error_code::PROTOCOL_VIOLATION, "bad user id");
                    return false;
                }
                if !crate::auth::authenticate(user, token) {
                    core.edge
                        .fail(index, error_code::AUTH_FAILED, "authentication failed");
                    return false;
                }
                let slot = core.edge.slot(index);
                slot.user = Some(user.into());
                slot.state = SlotState::AwaitWelcome;
                core.route_login(conn, user);
                true
            }
            (SlotState::AwaitHello, _) => {
                core.edge.fail(
                    index,
                    error_code::PROTOCOL_VIOLATION,
                    "the first frame must be HELLO",
                );
                false
            }
            (_, ClientFrame::Hello { .. }) => {
                core.edge.fail(
                    index,
                    error_code::PROTOCOL_VIOLATION,
                    "HELLO already received",
                );
                false
            }
            (_, ClientFrame::Send { msg_id, to, body }) => {
                // A handle, not a take: a delivery made during this SEND's
                // routing may need the slot's user (to rewind its shard).
                let user = core
                    .edge
                    .slot(index)
                    .user
                    .clone()
                    .expect("a Ready connection has a user");
                match precheck_send(&user, to, body.len(), &core.edge) {
                    Some((code, reason)) => core.reject_here(index, msg_id, code, reason),
                    None => {
                        core.edge.slot(index).sends_in_flight += 1;
                        core.edge.sends_in_flight_total += 1;
                        core.route_send(conn, &user, msg_id, to, body);
                    }
                }
                true
            }
            (_, ClientFrame::Ack { seq }) => {
                let slot = core.edge.slot(index);
                if seq > slot.delivered_seq_max {
                    core.edge.fail(
                        index,
                        error_code::PROTOCOL_VIOLATION,
                        "ACK of a seq not delivered",
                    );
                    return false;
                }
                let user = slot.user.clone().expect("a Ready connection has a user");
                core.route_ack(&user, seq);
                true
            }
            (_, ClientFrame::Ping { nonce }) => {
                core.edge.write_frame(index, &ServerFrame::Pong { nonce });
                true
            }
            (_, ClientFrame::Bye) => {
                core.edge.slot(index).state = SlotState::Closing;
                false
            }
        }
    }

    /// Leaves the shard's presence and frees the slot (the socket closes with the stream).
    fn release(&mut self) {
        let mut core = self.core.borrow_mut();
        let conn = self.conn_ref(core.edge.id);
        if let Some(buf) = self.rbuf.take() {
            if self.parked {
                core.edge.partial_frame_bytes -= buf.len();
            } else {
                core.edge.give_read_buffer(buf);
            }
        }
        let user = core.edge.slot(self.index).user.take();
        if let Some(user) = user {
            core.route_logout(conn, &user);
        }
        core.edge.release_slot(self.index);
    }
}
