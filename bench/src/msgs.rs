//! `iris-bench msgs`: C senders each keep W SENDs in flight.
//!
//! Sender `i` sends to recipient `i`. Online (the default) every recipient is
//! connected and ACKs what it gets; `--offline` leaves them away, so the run
//! measures pure durable storing. With `--proto redis` each sender LPUSHes to
//! its recipient's list instead (an ack is the integer reply).
//!
//! Threads: one per driver core (the CPUs this process may run on), pinned,
//! each an epoll loop over the pairs it owns; a pair (sender and recipient)
//! lives on one thread, so the exactly-once bookkeeping needs no sharing.
//!
//! A message id is `pair u32 | counter u32 | send time ns u64` (little-endian,
//! time since the run started), so a STORED or a DELIVER alone tells whose
//! message it is and how old it is.
//!
//! Phases: warm-up (sending, not counted), measure (acks counted and timed,
//! CPU sampled at both ends), drain (no new sends; wait for the answers and
//! deliveries still due, bounded by `drain_timeout`).

use crate::conn::Conn;
use crate::handshake::{self, Proto};
use crate::poller::{Event, Poller};
use crate::resp;
use crate::stats::{LatencyHist, LatencySummary};
use net::{ClientFrame, Limits, MsgId, ServerFrame};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Error messages kept as samples (the rest are only counted).
const ERROR_SAMPLES_MAX: usize = 5;
/// Longest an event-loop wait blocks, so phase changes are seen promptly.
const POLL_WAIT_MAX: Duration = Duration::from_millis(10);
/// REJECTED codes are counted individually up to this value; larger ones share the last slot.
const REJECT_CODES: usize = 8;

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_DRAIN: u8 = 2;

const ANSWER_PENDING: u8 = 0;
const ANSWER_STORED: u8 = 1;
const ANSWER_REJECTED: u8 = 2;

#[derive(Clone, Debug)]
pub struct MsgsConfig {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub conns: usize,
    pub inflight: usize,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub offline: bool,
    pub server_pid: Option<u32>,
    pub threads: usize,
    pub access: crate::handshake::Access,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    /// Print a live progress line to stderr once a second.
    pub progress: bool,
    /// The primary's admin HTTP address: sample replica lag while measuring.
    pub admin: Option<SocketAddr>,
}

/// Everything `msgs` reports; the keys are documented in bench/README.md.
#[derive(Debug, Serialize)]
pub struct MsgsReport {
    pub mode: &'static str,
    pub proto: Proto,
    pub offline: bool,
    pub conns: usize,
    pub inflight: usize,
    pub size: usize,
    pub driver_threads: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub stored: u64,
    pub stored_per_sec: f64,
    pub stored_total: u64,
    pub rejected: u64,
    pub rejected_by_code: Vec<(u16, u64)>,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub unanswered: u64,
    pub ack_mean_us: f64,
    pub ack_p50_us: f64,
    pub ack_p99_us: f64,
    pub ack_p999_us: f64,
    pub ack_max_us: f64,
    pub e2e_p50_us: Option<f64>,
    pub e2e_p99_us: Option<f64>,
    pub e2e_p999_us: Option<f64>,
    pub e2e_max_us: Option<f64>,
    pub server_cpu_us_per_msg: Option<f64>,
    pub server_cpu_util: Option<f64>,
    pub driver_cpu_us_per_msg: f64,
    pub driver_cpu_util: f64,
    pub exactly_once: Option<bool>,
    pub delivered: u64,
    pub missing_deliveries: u64,
    pub duplicate_deliveries: u64,
    pub unexpected_deliveries: u64,
    pub seq_gaps: u64,
    /// Replica lag sampled every 10 ms from the primary's admin stats (with --admin).
    pub replica_lag_p50_ms: Option<f64>,
    pub replica_lag_p99_ms: Option<f64>,
    pub replica_lag_max_ms: Option<f64>,
    pub replica_lag_samples: Option<u64>,
}

/// The phase, set by the main thread, and counters it reads for the progress line.
struct Shared {
    phase: AtomicU8,
    stored: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    /// Senders that completed their greeting.
    senders_open: AtomicU64,
}

impl Shared {
    fn new() -> Self {
        Self {
            phase: AtomicU8::new(PHASE_WARMUP),
            stored: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            senders_open: AtomicU64::new(0),
        }
    }
}

/// Per-message id layout: see the module comment.
pub fn make_msg_id(pair: u32, counter: u32, sent_ns: u64) -> MsgId {
    let mut id = [0u8; 16];
    id[0..4].copy_from_slice(&pair.to_le_bytes());
    id[4..8].copy_from_slice(&counter.to_le_bytes());
    id[8..16].copy_from_slice(&sent_ns.to_le_bytes());
    id
}

pub fn parse_msg_id(id: &MsgId) -> (u32, u32, u64) {
    let pair = u32::from_le_bytes(id[0..4].try_into().expect("4 bytes"));
    let counter = u32::from_le_bytes(id[4..8].try_into().expect("4 bytes"));
    let sent_ns = u64::from_le_bytes(id[8..16].try_into().expect("8 bytes"));
    (pair, counter, sent_ns)
}

/// A short id for this run, so users of different runs never share an inbox.
fn run_nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{:08x}",
        (nanos ^ u64::from(std::process::id()).rotate_left(32)) as u32
    )
}

/// What one worker thread counted.
#[derive(Default)]
struct Tally {
    stored_measured: u64,
    stored_total: u64,
    rejected_by_code: [u64; REJECT_CODES],
    rejected_total: u64,
    errors: u64,
    error_samples: Vec<String>,
    unanswered: u64,
    ack_hist: LatencyHist,
    e2e_hist: LatencyHist,
    delivered: u64,
    missing: u64,
    duplicates: u64,
    unexpected: u64,
    seq_gaps: u64,
}

impl Tally {
    fn error(&mut self, shared: &Shared, message: String) {
        self.errors += 1;
        shared.errors.fetch_add(1, Ordering::Relaxed);
        if self.error_samples.len() < ERROR_SAMPLES_MAX {
            self.error_samples.push(message);
        }
    }
}

/// The bookkeeping of one sender/recipient pair.
struct Track {
    index: u32,
    from: String,
    to: String,
    next_counter: u32,
    inflight: usize,
    /// Per counter: ANSWER_PENDING, ANSWER_STORED or ANSWER_REJECTED.
    answers: Vec<u8>,
    /// Per counter: times delivered (online mode only), saturating.
    deliveries: Vec<u8>,
    stored: u64,
    delivered_unique: u64,
    last_seq: u64,
    acked_seq: u64,
    /// Redis answers in order: the ids of the LPUSHes in flight, oldest first.
    fifo: VecDeque<MsgId>,
    lpush_prefix: Vec<u8>,
}

struct Pair {
    sender: Option<Conn>,
    receiver: Option<Conn>,
    track: Track,
}

/// What a worker thread needs to know.
struct Worker {
    cfg: MsgsConfig,
    shared: Arc<Shared>,
    epoch: Instant,
    body: Vec<u8>,
    limits: Limits,
}

pub fn run(cfg: &MsgsConfig) -> Result<MsgsReport, String> {
    assert!(cfg.conns > 0 && cfg.inflight > 0 && cfg.threads > 0);
    if cfg.conns > u32::MAX as usize {
        return Err("too many connections".to_string());
    }
    if let Some(pid) = cfg.server_pid {
        crate::procfs::cpu_ns(pid).map_err(|e| format!("--server-pid {pid}: {e}"))?;
    }
    let online = !cfg.offline && cfg.proto == Proto::Iris;
    let threads = cfg.threads.min(cfg.conns);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let shared = Arc::new(Shared::new());
    let barrier = Arc::new(Barrier::new(threads + 1));
    let epoch = Instant::now();
    let nonce = run_nonce();
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let indices: Vec<u32> = (t..cfg.conns).step_by(threads).map(|i| i as u32).collect();
        let worker = Worker {
            cfg: cfg.clone(),
            shared: shared.clone(),
            epoch,
            body: vec![b'x'; cfg.size],
            limits: Limits::default(),
        };
        let barrier = barrier.clone();
        let core = cores.get(t % cores.len().max(1)).copied();
        let nonce = nonce.clone();
        let handle = std::thread::Builder::new()
            .name(format!("driver-{t}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                worker.run(&indices, &nonce, online, &barrier)
            })
            .map_err(|e| format!("spawn: {e}"))?;
        handles.push(handle);
    }
    barrier.wait();
    let timing = if shared.senders_open.load(Ordering::Relaxed) == 0 {
        Err("no sender could connect".to_string())
    } else {
        drive_phases(cfg, &shared)
    };
    // Whatever happened, the workers drain and stop (their loops end with the drain).
    shared.phase.store(PHASE_DRAIN, Ordering::Relaxed);
    let mut tallies = Vec::with_capacity(threads);
    for handle in handles {
        tallies.push(
            handle
                .join()
                .map_err(|_| "a driver thread panicked".to_string())?,
        );
    }
    let timing = timing.map_err(|e| {
        let first = tallies.iter().flat_map(|t| t.error_samples.first()).next();
        format!(
            "{e} (first error: {})",
            first.map_or("none", String::as_str)
        )
    })?;
    Ok(report(cfg, threads, online, &timing, tallies))
}

/// CPU and wall time of the measured window.
struct Timing {
    measured: Duration,
    /// Replica lag over the measured window, and failed samples.
    lag: Option<(LatencySummary, u64)>,
    server_cpu_ns: Option<u64>,
    driver_cpu_ns: u64,
}

/// Runs the clock on the main thread: warm-up, measure (sampling CPU at both
/// ends), then drain. Prints the progress line while it waits.
fn drive_phases(cfg: &MsgsConfig, shared: &Shared) -> Result<Timing, String> {
    let me = std::process::id();
    let mut progress = Progress::new(cfg.progress, shared);
    progress.sleep(cfg.warmup, "warm-up");
    let server_before = cfg.server_pid.map(crate::procfs::cpu_ns).transpose();
    let server_before = server_before.map_err(|e| format!("server cpu: {e}"))?;
    let driver_before = crate::procfs::cpu_ns(me).map_err(|e| format!("driver cpu: {e}"))?;
    let start = Instant::now();
    shared.phase.store(PHASE_MEASURE, Ordering::Relaxed);
    let sampler = cfg.admin.map(crate::lag::start);
    progress.sleep(cfg.duration, "measure");
    shared.phase.store(PHASE_DRAIN, Ordering::Relaxed);
    let measured = start.elapsed();
    let lag = sampler.map(crate::lag::LagSampler::stop);
    let server_after = cfg.server_pid.map(crate::procfs::cpu_ns).transpose();
    let server_after = server_after.map_err(|e| format!("server cpu: {e}"))?;
    let driver_after = crate::procfs::cpu_ns(me).map_err(|e| format!("driver cpu: {e}"))?;
    progress.finish();
    Ok(Timing {
        measured,
        lag,
        server_cpu_ns: server_before
            .zip(server_after)
            .map(|(b, a)| a.saturating_sub(b)),
        driver_cpu_ns: driver_after.saturating_sub(driver_before),
    })
}

/// The live progress line (stderr, a terminal only).
struct Progress<'a> {
    enabled: bool,
    shared: &'a Shared,
    last_stored: u64,
    started: Instant,
}

impl<'a> Progress<'a> {
    fn new(enabled: bool, shared: &'a Shared) -> Self {
        Self {
            enabled,
            shared,
            last_stored: 0,
            started: Instant::now(),
        }
    }

    /// Sleeps `total`, updating the line once a second.
    fn sleep(&mut self, total: Duration, phase: &str) {
        let end = Instant::now() + total;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let step = left.min(Duration::from_secs(1));
            std::thread::sleep(step);
            if self.enabled {
                let stored = self.shared.stored.load(Ordering::Relaxed);
                let rate = (stored - self.last_stored) as f64 / step.as_secs_f64();
                self.last_stored = stored;
                eprint!(
                    "\r{:>5.1}s {phase:<8} {:>10} stored/s  {} rejected  {} errors   ",
                    self.started.elapsed().as_secs_f64(),
                    crate::stats::thousands(rate as u64),
                    self.shared.rejected.load(Ordering::Relaxed),
                    self.shared.errors.load(Ordering::Relaxed),
                );
            }
        }
    }

    fn finish(&self) {
        if self.enabled {
            eprintln!();
        }
    }
}

impl Worker {
    fn run(&self, indices: &[u32], nonce: &str, online: bool, barrier: &Barrier) -> Tally {
        let mut tally = Tally::default();
        let mut poller = match Poller::new() {
            Ok(p) => p,
            Err(e) => {
                tally.error(&self.shared, format!("epoll: {e}"));
                barrier.wait();
                return tally;
            }
        };
        let mut pairs: Vec<Pair> = indices
            .iter()
            .enumerate()
            .map(|(slot, &index)| self.open_pair(slot, index, nonce, online, &poller, &mut tally))
            .collect();
        barrier.wait();
        let now_ns = self.now_ns();
        for pair in pairs.iter_mut() {
            self.refill(pair, now_ns, online, &poller, &mut tally);
        }
        self.event_loop(&mut pairs, &mut poller, online, &mut tally);
        self.finish(&mut pairs, online, &mut tally);
        tally
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn open_pair(
        &self,
        slot: usize,
        index: u32,
        nonce: &str,
        online: bool,
        poller: &Poller,
        tally: &mut Tally,
    ) -> Pair {
        let from = format!("s{nonce}-{index}");
        let to = match self.cfg.proto {
            Proto::Iris => format!("r{nonce}-{index}"),
            Proto::Redis => format!("inbox:r{nonce}-{index}"),
        };
        let receiver = if online {
            self.open_conn(&to, slot as u64 * 2 + 1, poller, tally)
        } else {
            None
        };
        let sender = self.open_conn(&from, slot as u64 * 2, poller, tally);
        if sender.is_some() {
            self.shared.senders_open.fetch_add(1, Ordering::Relaxed);
        }
        let lpush_prefix = resp::lpush_prefix(&to, self.cfg.size);
        Pair {
            sender,
            receiver,
            track: Track {
                index,
                from,
                to,
                next_counter: 0,
                inflight: 0,
                answers: Vec::new(),
                deliveries: Vec::new(),
                stored: 0,
                delivered_unique: 0,
                last_seq: 0,
                acked_seq: 0,
                fifo: VecDeque::with_capacity(self.cfg.inflight),
                lpush_prefix,
            },
        }
    }

    fn open_conn(
        &self,
        user: &str,
        token: u64,
        poller: &Poller,
        tally: &mut Tally,
    ) -> Option<Conn> {
        let opened = handshake::connect(
            self.cfg.addr,
            self.cfg.proto,
            user,
            &self.cfg.access,
            self.cfg.connect_timeout,
        );
        let result = opened.and_then(|(stream, greeting)| {
            if greeting.pending != 0 {
                return Err(format!(
                    "{user}: fresh inbox has {} pending",
                    greeting.pending
                ));
            }
            Conn::register(stream, token, poller).map_err(|e| format!("register: {e}"))
        });
        match result {
            Ok(conn) => Some(conn),
            Err(e) => {
                tally.error(&self.shared, format!("{user}: {e}"));
                None
            }
        }
    }

    fn event_loop(&self, pairs: &mut [Pair], poller: &mut Poller, online: bool, tally: &mut Tally) {
        let mut events: Vec<Event> = Vec::with_capacity(crate::poller::EVENTS_PER_WAIT_MAX);
        let mut drain_deadline: Option<Instant> = None;
        let mut reported = (0u64, 0u64);
        loop {
            let phase = self.shared.phase.load(Ordering::Relaxed);
            if phase == PHASE_DRAIN {
                let deadline =
                    *drain_deadline.get_or_insert(Instant::now() + self.cfg.drain_timeout);
                if Instant::now() >= deadline || pairs.iter().all(|p| p.settled(online)) {
                    return;
                }
            }
            if let Err(e) = poller.wait(POLL_WAIT_MAX, &mut events) {
                tally.error(&self.shared, format!("epoll_wait: {e}"));
                return;
            }
            let measuring = phase == PHASE_MEASURE;
            let sending = phase != PHASE_DRAIN;
            for event in &events {
                let pair = &mut pairs[(event.token / 2) as usize];
                if event.token % 2 == 0 {
                    self.on_sender_event(pair, event, measuring, sending, online, poller, tally);
                } else {
                    self.on_receiver_event(pair, event, measuring, poller, tally);
                }
            }
            let stored_delta = tally.stored_total - reported.0;
            let rejected_delta = tally.rejected_total - reported.1;
            if stored_delta > 0 {
                self.shared
                    .stored
                    .fetch_add(stored_delta, Ordering::Relaxed);
            }
            if rejected_delta > 0 {
                self.shared
                    .rejected
                    .fetch_add(rejected_delta, Ordering::Relaxed);
            }
            reported = (tally.stored_total, tally.rejected_total);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_sender_event(
        &self,
        pair: &mut Pair,
        event: &Event,
        measuring: bool,
        sending: bool,
        online: bool,
        poller: &Poller,
        tally: &mut Tally,
    ) {
        let Some(conn) = pair.sender.as_mut() else {
            return;
        };
        let mut result = Ok(());
        if event.readable || event.closed {
            result = conn.fill().and_then(|got| {
                if !got {
                    return Ok(());
                }
                let now_ns = self.now_ns();
                let used = match self.cfg.proto {
                    Proto::Iris => self.decode_answers(
                        conn.unread(),
                        &mut pair.track,
                        now_ns,
                        measuring,
                        tally,
                    )?,
                    Proto::Redis => decode_redis_answers(
                        conn.unread(),
                        &mut pair.track,
                        now_ns,
                        measuring,
                        tally,
                    )?,
                };
                conn.consume(used);
                Ok(())
            });
        }
        if result.is_ok() && (event.writable || conn.has_pending_writes()) {
            result = conn.flush(poller);
        }
        match result {
            Ok(()) if sending => self.refill(pair, self.now_ns(), online, poller, tally),
            Ok(()) => {}
            Err(e) => self.drop_sender(pair, poller, tally, e),
        }
    }

    fn drop_sender(&self, pair: &mut Pair, poller: &Poller, tally: &mut Tally, why: String) {
        if let Some(conn) = pair.sender.take() {
            conn.deregister(poller);
        }
        tally.error(&self.shared, format!("{}: {why}", pair.track.from));
    }

    /// Decodes STORED/REJECTED frames; returns the bytes consumed.
    fn decode_answers(
        &self,
        buf: &[u8],
        track: &mut Track,
        now_ns: u64,
        measuring: bool,
        tally: &mut Tally,
    ) -> Result<usize, String> {
        let mut used = 0;
        loop {
            let decoded = net::decode_server_frame(&buf[used..], &self.limits);
            let (frame, len) = match decoded {
                Ok(Some(decoded)) => decoded,
                Ok(None) => return Ok(used),
                Err(e) => return Err(format!("decode: {e}")),
            };
            used += len;
            match frame {
                ServerFrame::Stored { msg_id } => {
                    track.answer(&msg_id, None, now_ns, measuring, tally)?
                }
                ServerFrame::Rejected { msg_id, code, .. } => {
                    track.answer(&msg_id, Some(code), now_ns, measuring, tally)?
                }
                ServerFrame::Error { code, reason } => {
                    return Err(format!("ERROR {code} {reason}"))
                }
                other => return Err(format!("unexpected frame on a sender: {other:?}")),
            }
        }
    }

    /// Tops the sender up to W messages in flight and flushes.
    fn refill(
        &self,
        pair: &mut Pair,
        now_ns: u64,
        online: bool,
        poller: &Poller,
        tally: &mut Tally,
    ) {
        let Some(conn) = pair.sender.as_mut() else {
            return;
        };
        let track = &mut pair.track;
        if track.inflight >= self.cfg.inflight {
            return;
        }
        while track.inflight < self.cfg.inflight {
            let msg_id = make_msg_id(track.index, track.next_counter, now_ns);
            match self.cfg.proto {
                Proto::Iris => net::encode_client_frame(
                    &ClientFrame::Send {
                        msg_id,
                        to: &track.to,
                        body: &self.body,
                    },
                    &mut conn.wbuf,
                ),
                Proto::Redis => {
                    resp::encode_lpush(&track.lpush_prefix, &self.body, &mut conn.wbuf);
                    track.fifo.push_back(msg_id);
                }
            }
            track.answers.push(ANSWER_PENDING);
            if online {
                track.deliveries.push(0);
            }
            track.next_counter = track
                .next_counter
                .checked_add(1)
                .expect("fewer than 2^32 messages per sender");
            track.inflight += 1;
        }
        if let Err(e) = conn.flush(poller) {
            self.drop_sender(pair, poller, tally, e);
        }
    }

    fn on_receiver_event(
        &self,
        pair: &mut Pair,
        event: &Event,
        measuring: bool,
        poller: &Poller,
        tally: &mut Tally,
    ) {
        let Some(conn) = pair.receiver.as_mut() else {
            return;
        };
        let mut result = Ok(());
        if event.readable || event.closed {
            result = conn.fill().and_then(|got| {
                if !got {
                    return Ok(());
                }
                let now_ns = self.now_ns();
                let used = self.decode_deliveries(
                    conn.unread(),
                    &mut pair.track,
                    now_ns,
                    measuring,
                    tally,
                )?;
                conn.consume(used);
                let track = &mut pair.track;
                if track.last_seq > track.acked_seq {
                    let ack = ClientFrame::Ack {
                        seq: track.last_seq,
                    };
                    net::encode_client_frame(&ack, &mut conn.wbuf);
                    track.acked_seq = track.last_seq;
                }
                Ok(())
            });
        }
        if result.is_ok() && (event.writable || conn.has_pending_writes()) {
            result = conn.flush(poller);
        }
        if let Err(e) = result {
            if let Some(conn) = pair.receiver.take() {
                conn.deregister(poller);
            }
            tally.error(&self.shared, format!("{}: {e}", pair.track.to));
        }
    }

    fn decode_deliveries(
        &self,
        buf: &[u8],
        track: &mut Track,
        now_ns: u64,
        measuring: bool,
        tally: &mut Tally,
    ) -> Result<usize, String> {
        let mut used = 0;
        loop {
            let decoded = net::decode_server_frame(&buf[used..], &self.limits);
            let (frame, len) = match decoded {
                Ok(Some(decoded)) => decoded,
                Ok(None) => return Ok(used),
                Err(e) => return Err(format!("decode: {e}")),
            };
            used += len;
            match frame {
                ServerFrame::Deliver {
                    seq, msg_id, from, ..
                } => track.deliver(seq, &msg_id, from, now_ns, measuring, tally),
                ServerFrame::Error { code, reason } => {
                    return Err(format!("ERROR {code} {reason}"))
                }
                other => return Err(format!("unexpected frame on a recipient: {other:?}")),
            }
        }
    }

    /// Says goodbye on every connection and settles the exactly-once books.
    fn finish(&self, pairs: &mut [Pair], online: bool, tally: &mut Tally) {
        let mut bye = Vec::new();
        if self.cfg.proto == Proto::Iris {
            net::encode_client_frame(&ClientFrame::Bye, &mut bye);
        }
        for pair in pairs.iter_mut() {
            for mut conn in [pair.sender.take(), pair.receiver.take()]
                .into_iter()
                .flatten()
            {
                // Best effort: the socket buffer is empty after the drain.
                let _ = std::io::Write::write(&mut conn.stream, &bye);
            }
            tally.unanswered += pair.track.inflight as u64;
            if online {
                pair.track.settle(tally);
            }
        }
    }
}

fn decode_redis_answers(
    buf: &[u8],
    track: &mut Track,
    now_ns: u64,
    measuring: bool,
    tally: &mut Tally,
) -> Result<usize, String> {
    let mut used = 0;
    while let Some((reply, len)) = resp::decode_reply(&buf[used..])? {
        used += len;
        let msg_id = track
            .fifo
            .pop_front()
            .ok_or_else(|| format!("reply with nothing in flight: {reply:?}"))?;
        let code = match reply {
            resp::Reply::Integer(_) => None,
            // An error reply counts as REJECTED with a code no Iris reply uses.
            resp::Reply::Error(_) => Some(0),
            other => return Err(format!("unexpected reply to LPUSH: {other:?}")),
        };
        track.answer(&msg_id, code, now_ns, measuring, tally)?;
    }
    Ok(used)
}

impl Pair {
    /// Nothing left to wait for in the drain.
    fn settled(&self, online: bool) -> bool {
        let answered = self.sender.is_none() || self.track.inflight == 0;
        let delivered =
            !online || self.receiver.is_none() || self.track.delivered_unique >= self.track.stored;
        answered && delivered
    }
}

impl Track {
    fn answer(
        &mut self,
        msg_id: &MsgId,
        code: Option<u16>,
        now_ns: u64,
        measuring: bool,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let (pair, counter, sent_ns) = parse_msg_id(msg_id);
        if pair != self.index || counter >= self.next_counter {
            return Err(format!("answer for a message never sent: {msg_id:02x?}"));
        }
        let answer = &mut self.answers[counter as usize];
        if *answer != ANSWER_PENDING {
            return Err(format!("second answer for message {counter}"));
        }
        self.inflight -= 1;
        match code {
            None => {
                *answer = ANSWER_STORED;
                self.stored += 1;
                tally.stored_total += 1;
                if measuring {
                    tally.stored_measured += 1;
                    tally.ack_hist.record_ns(now_ns.saturating_sub(sent_ns));
                }
            }
            Some(code) => {
                *answer = ANSWER_REJECTED;
                tally.rejected_total += 1;
                tally.rejected_by_code[usize::from(code).min(REJECT_CODES - 1)] += 1;
            }
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        seq: u64,
        msg_id: &MsgId,
        from: &str,
        now_ns: u64,
        measuring: bool,
        tally: &mut Tally,
    ) {
        if seq != self.last_seq + 1 {
            tally.seq_gaps += 1;
        }
        self.last_seq = self.last_seq.max(seq);
        tally.delivered += 1;
        let (pair, counter, sent_ns) = parse_msg_id(msg_id);
        if pair != self.index || counter >= self.next_counter || from != self.from {
            tally.unexpected += 1;
            return;
        }
        let count = &mut self.deliveries[counter as usize];
        if *count == 0 {
            self.delivered_unique += 1;
            if measuring {
                tally.e2e_hist.record_ns(now_ns.saturating_sub(sent_ns));
            }
        } else {
            tally.duplicates += 1;
        }
        *count = count.saturating_add(1);
    }

    /// Every STORED message delivered once; nothing REJECTED delivered.
    fn settle(&self, tally: &mut Tally) {
        for (answer, count) in self.answers.iter().zip(&self.deliveries) {
            match (*answer, *count) {
                (ANSWER_STORED, 0) => tally.missing += 1,
                (ANSWER_REJECTED, n) if n > 0 => tally.unexpected += 1,
                _ => {}
            }
        }
    }
}

fn report(
    cfg: &MsgsConfig,
    threads: usize,
    online: bool,
    timing: &Timing,
    tallies: Vec<Tally>,
) -> MsgsReport {
    let mut total = Tally::default();
    for t in tallies {
        total.stored_measured += t.stored_measured;
        total.stored_total += t.stored_total;
        total.rejected_total += t.rejected_total;
        for (sum, n) in total.rejected_by_code.iter_mut().zip(t.rejected_by_code) {
            *sum += n;
        }
        total.errors += t.errors;
        let room = ERROR_SAMPLES_MAX.saturating_sub(total.error_samples.len());
        total
            .error_samples
            .extend(t.error_samples.into_iter().take(room));
        total.unanswered += t.unanswered;
        total.ack_hist.merge(&t.ack_hist);
        total.e2e_hist.merge(&t.e2e_hist);
        total.delivered += t.delivered;
        total.missing += t.missing;
        total.duplicates += t.duplicates;
        total.unexpected += t.unexpected;
        total.seq_gaps += t.seq_gaps;
    }
    let secs = timing.measured.as_secs_f64();
    let per_msg_us = |ns: u64| {
        if total.stored_measured == 0 {
            0.0
        } else {
            ns as f64 / 1000.0 / total.stored_measured as f64
        }
    };
    let ack: LatencySummary = total.ack_hist.summary();
    let e2e = online.then(|| total.e2e_hist.summary());
    MsgsReport {
        mode: "msgs",
        proto: cfg.proto,
        offline: !online,
        conns: cfg.conns,
        inflight: cfg.inflight,
        size: cfg.size,
        driver_threads: threads,
        warmup_s: cfg.warmup.as_secs_f64(),
        duration_s: secs,
        stored: total.stored_measured,
        stored_per_sec: total.stored_measured as f64 / secs,
        stored_total: total.stored_total,
        rejected: total.rejected_total,
        rejected_by_code: (0..REJECT_CODES)
            .filter(|&c| total.rejected_by_code[c] > 0)
            .map(|c| (c as u16, total.rejected_by_code[c]))
            .collect(),
        errors: total.errors,
        error_samples: total.error_samples,
        unanswered: total.unanswered,
        ack_mean_us: ack.mean_us,
        ack_p50_us: ack.p50_us,
        ack_p99_us: ack.p99_us,
        ack_p999_us: ack.p999_us,
        ack_max_us: ack.max_us,
        e2e_p50_us: e2e.map(|s| s.p50_us),
        e2e_p99_us: e2e.map(|s| s.p99_us),
        e2e_p999_us: e2e.map(|s| s.p999_us),
        e2e_max_us: e2e.map(|s| s.max_us),
        server_cpu_us_per_msg: timing.server_cpu_ns.map(per_msg_us),
        server_cpu_util: timing.server_cpu_ns.map(|ns| ns as f64 / 1e9 / secs),
        driver_cpu_us_per_msg: per_msg_us(timing.driver_cpu_ns),
        driver_cpu_util: timing.driver_cpu_ns as f64 / 1e9 / secs,
        exactly_once: online.then_some(
            total.missing == 0
                && total.duplicates == 0
                && total.unexpected == 0
                && total.stored_total > 0,
        ),
        delivered: total.delivered,
        missing_deliveries: total.missing,
        duplicate_deliveries: total.duplicates,
        unexpected_deliveries: total.unexpected,
        seq_gaps: total.seq_gaps,
        replica_lag_p50_ms: timing.lag.as_ref().map(|(l, _)| l.p50_us / 1000.0),
        replica_lag_p99_ms: timing.lag.as_ref().map(|(l, _)| l.p99_us / 1000.0),
        replica_lag_max_ms: timing.lag.as_ref().map(|(l, _)| l.max_us / 1000.0),
        replica_lag_samples: timing.lag.as_ref().map(|(l, _)| l.count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_ids_round_trip() {
        let id = make_msg_id(7, 123_456, 987_654_321_000);
        assert_eq!(parse_msg_id(&id), (7, 123_456, 987_654_321_000));
    }
}
