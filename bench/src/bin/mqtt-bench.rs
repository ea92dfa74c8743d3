//! `mqtt-bench`: QoS 1 PUBLISH load on any MQTT 3.1.1 broker, for the
//! comparison of Iris's `--mqtt-listen` with Mosquitto (bench/mqtt/compare.sh,
//! BENCHMARKS.md) on the same load shape.
//!
//! C connections spread over T driver threads (`--threads`, default 1), each
//! thread an epoll loop over its non-blocking sockets (`bench::poller`, as
//! `iris-bench` drives Iris's own protocol): the same driver cost for every
//! broker, and no thread per connection to wake. Each connection keeps W QoS 1
//! PUBLISHes of S bytes in flight: a new one as soon as a PUBACK comes. Sender
//! `s<run>-<i>` publishes to `inbox/r<run>-<i>` (an Iris inbox; on Mosquitto a
//! topic without subscribers). Phases: warm-up (not counted), the measured
//! `--duration` (PUBACKs counted and their latency, PUBLISH queued to PUBACK
//! decoded, recorded), then the connections stop. One JSON object on stdout.
//!
//! Every frame goes through the `mqtt` codec the server uses; only loopback
//! addresses are accepted.

use bench::conn::{Conn, Stream};
use bench::poller::{Event, Poller};
use bench::stats::{parse_duration, LatencyHist};
use clap::Parser;
use mqtt::{Connect, Packet, Publish, QoS};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections a run may open.
const CONNS_MAX: usize = 1024;
/// Driver threads a run may start.
const THREADS_MAX: usize = 64;
/// PUBLISHes one connection may keep in flight (distinct packet ids).
const INFLIGHT_MAX: usize = 4096;
/// A connection silent this long while it waits for an answer fails the run.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one epoll wait sleeps at most (the phase is checked between).
const POLL_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Parser)]
#[command(
    name = "mqtt-bench",
    version,
    about = "QoS 1 PUBLISH throughput and PUBACK latency of an MQTT 3.1.1 broker"
)]
struct Args {
    /// The broker's MQTT address (loopback only).
    #[arg(long)]
    addr: SocketAddr,
    /// Connections, each with its own sender.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Driver threads (epoll loops) the connections are spread over.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// QoS 1 PUBLISHes each connection keeps in flight.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Measured time (`10s`, `500ms`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Sending before the measured time (not counted).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// The MQTT password (Iris with --auth none, and Mosquitto with
    /// allow_anonymous, take any).
    #[arg(long, default_value = "x")]
    password: String,
    /// The broker's pid, for its CPU time per message (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// A name for the broker in the output.
    #[arg(long, default_value = "mqtt")]
    label: String,
}

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_STOP: u8 = 2;

/// What one driver thread counted over its connections.
#[derive(Default)]
struct ThreadReport {
    pubacks_measured: u64,
    pubacks_total: u64,
    latency: LatencyHist,
    error: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check(&args) {
        eprintln!("mqtt-bench: {e}");
        return ExitCode::from(2);
    }
    let run = std::process::id();
    let phase = Arc::new(AtomicU8::new(PHASE_WARMUP));
    let failed = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..args.threads)
        .map(|t| {
            let (phase, failed) = (phase.clone(), failed.clone());
            let mine: Vec<usize> = (t..args.conns).step_by(args.threads).collect();
            let (addr, inflight, size) = (args.addr, args.inflight, args.size);
            let password = args.password.clone();
            std::thread::spawn(move || {
                let mut report = ThreadReport::default();
                let spec = Load {
                    addr,
                    run,
                    password: &password,
                    inflight,
                    size,
                };
                if let Err(e) = drive(&spec, &mine, &phase, &mut report) {
                    report.error = Some(e);
                    failed.store(true, Ordering::Relaxed);
                }
                report
            })
        })
        .collect();
    std::thread::sleep(args.warmup);
    let cpu_before = args.server_pid.map(bench::procfs::cpu_ns);
    let started = Instant::now();
    phase.store(PHASE_MEASURE, Ordering::SeqCst);
    std::thread::sleep(args.duration);
    phase.store(PHASE_STOP, Ordering::SeqCst);
    let measured = started.elapsed();
    let cpu_after = args.server_pid.map(bench::procfs::cpu_ns);
    let mut latency = LatencyHist::new();
    let (mut pubacks, mut total, mut errors) = (0u64, 0u64, Vec::new());
    for t in threads {
        let report = t.join().expect("a driver thread panicked");
        pubacks += report.pubacks_measured;
        total += report.pubacks_total;
        latency.merge(&report.latency);
        errors.extend(report.error);
    }
    let lat = latency.summary();
    let server_cpu_us_per_msg = match (cpu_before, cpu_after) {
        (Some(Ok(a)), Some(Ok(b))) if pubacks > 0 => {
            Some(b.saturating_sub(a) as f64 / 1000.0 / pubacks as f64)
        }
        _ => None,
    };
    let out = serde_json::json!({
        "label": args.label,
        "addr": args.addr.to_string(),
        "conns": args.conns,
        "threads": args.threads,
        "inflight": args.inflight,
        "size": args.size,
        "warmup_s": args.warmup.as_secs_f64(),
        "duration_s": measured.as_secs_f64(),
        "pubacks": pubacks,
        "pubacks_total": total,
        "pubacks_per_sec": pubacks as f64 / measured.as_secs_f64(),
        "puback_p50_us": lat.p50_us,
        "puback_p99_us": lat.p99_us,
        "puback_p999_us": lat.p999_us,
        "puback_max_us": lat.max_us,
        "server_cpu_us_per_msg": server_cpu_us_per_msg,
        "errors": errors.len(),
        "error_samples": errors.iter().take(5).collect::<Vec<_>>(),
    });
    println!("{out}");
    if failed.load(Ordering::Relaxed) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn check(args: &Args) -> Result<(), String> {
    if !args.addr.ip().is_loopback() {
        return Err(format!("{} is not a loopback address", args.addr));
    }
    if !(1..=CONNS_MAX).contains(&args.conns) {
        return Err(format!("--conns must be 1..={CONNS_MAX}"));
    }
    if !(1..=THREADS_MAX).contains(&args.threads) || args.threads > args.conns {
        return Err(format!(
            "--threads must be 1..={THREADS_MAX} and at most --conns"
        ));
    }
    if !(1..=INFLIGHT_MAX).contains(&args.inflight) {
        return Err(format!("--inflight must be 1..={INFLIGHT_MAX}"));
    }
    if args.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    Ok(())
}

/// What every connection of a run shares.
struct Load<'a> {
    addr: SocketAddr,
    run: u32,
    password: &'a str,
    inflight: usize,
    size: usize,
}

/// One connection of a driver thread.
struct MqttConn {
    conn: Conn,
    user: String,
    topic: String,
    connected: bool,
    /// Packet id → when its PUBLISH was queued, and the phase then.
    sent_at: HashMap<u16, (Instant, u8)>,
    next_id: u16,
    last_read: Instant,
}

impl MqttConn {
    /// Queues one QoS 1 PUBLISH under a packet id not in flight.
    fn publish(&mut self, payload: &[u8], phase: u8) {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.sent_at.contains_key(&self.next_id) {
                break;
            }
        }
        mqtt::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: &self.topic,
                packet_id: self.next_id,
                payload,
            }),
            &mut self.conn.wbuf,
        );
        self.sent_at.insert(self.next_id, (Instant::now(), phase));
    }
}

/// One driver thread: connects its connections (CONNECT each), then keeps
/// W PUBLISHes in flight on each until the phase is STOP.
fn drive(
    load: &Load<'_>,
    indexes: &[usize],
    phase: &AtomicU8,
    report: &mut ThreadReport,
) -> Result<(), String> {
    let mut poller = Poller::new().map_err(|e| format!("epoll: {e}"))?;
    let payload = vec![b'x'; load.size];
    let limits = mqtt::Limits::default();
    let mut conns = Vec::with_capacity(indexes.len());
    for (token, &i) in indexes.iter().enumerate() {
        let user = format!("s{}-{i}", load.run);
        let tcp = TcpStream::connect(load.addr).map_err(|e| format!("{user}: connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let conn = Conn::register(Stream::Plain(tcp), token as u64, &poller)
            .map_err(|e| format!("{user}: register: {e}"))?;
        let mut c = MqttConn {
            conn,
            topic: format!("inbox/r{}-{i}", load.run),
            user,
            connected: false,
            sent_at: HashMap::with_capacity(load.inflight),
            next_id: 0,
            last_read: Instant::now(),
        };
        mqtt::encode(
            &Packet::Connect(Connect {
                clean_session: true,
                keep_alive: 60,
                client_id: &c.user,
                will: None,
                username: Some(&c.user),
                password: Some(load.password.as_bytes()),
            }),
            &mut c.conn.wbuf,
        );
        c.conn.flush(&poller)?;
        conns.push(c);
    }
    let mut events: Vec<Event> = Vec::new();
    loop {
        let now_phase = phase.load(Ordering::Relaxed);
        if now_phase == PHASE_STOP {
            for c in &mut conns {
                mqtt::encode(&Packet::Disconnect, &mut c.conn.wbuf);
                let _ = c.conn.flush(&poller);
                c.conn.deregister(&poller);
            }
            return Ok(());
        }
        poller
            .wait(POLL_INTERVAL, &mut events)
            .map_err(|e| format!("epoll: {e}"))?;
        let now = Instant::now();
        for ev in &events {
            let c = &mut conns[ev.token as usize];
            if ev.readable || ev.closed {
                c.conn.fill().map_err(|e| format!("{}: {e}", c.user))?;
                c.last_read = now;
                let used = answers(c, &limits, &payload, now_phase, load.inflight, report)?;
                c.conn.consume(used);
            }
            c.conn
                .flush(&poller)
                .map_err(|e| format!("{}: {e}", c.user))?;
        }
        for c in &conns {
            let waiting = !c.sent_at.is_empty() || !c.connected;
            if waiting && now.duration_since(c.last_read) > READ_TIMEOUT {
                return Err(format!(
                    "{}: the broker was silent for {READ_TIMEOUT:?}",
                    c.user
                ));
            }
        }
    }
}

/// Handles the packets in `c`'s read buffer; returns the bytes they took.
fn answers(
    c: &mut MqttConn,
    limits: &mqtt::Limits,
    payload: &[u8],
    now_phase: u8,
    inflight: usize,
    report: &mut ThreadReport,
) -> Result<usize, String> {
    let mut used = 0;
    let mut acked = Vec::new();
    let mut connack = None;
    {
        let unread = c.conn.unread();
        while let Some((packet, n)) = mqtt::decode(&unread[used..], limits)
            .map_err(|e| format!("{}: bad bytes from the broker: {e}", c.user))?
        {
            used += n;
            match packet {
                Packet::ConnAck(a) if !c.connected && connack.is_none() => {
                    connack = Some(a.code as u8)
                }
                Packet::PubAck { packet_id } if c.connected || connack == Some(0) => {
                    acked.push(packet_id)
                }
                other => return Err(format!("{}: unexpected {:?}", c.user, other.packet_type())),
            }
        }
    }
    if let Some(code) = connack {
        if code != 0 {
            return Err(format!("{}: CONNECT answered CONNACK {code}", c.user));
        }
        c.connected = true;
        for _ in 0..inflight {
            c.publish(payload, now_phase);
        }
    }
    for id in acked {
        let (at, sent_phase) = c
            .sent_at
            .remove(&id)
            .ok_or_else(|| format!("{}: PUBACK for packet id {id} not in flight", c.user))?;
        report.pubacks_total += 1;
        if sent_phase == PHASE_MEASURE && now_phase == PHASE_MEASURE {
            report.pubacks_measured += 1;
            report.latency.record_ns(at.elapsed().as_nanos() as u64);
        }
        c.publish(payload, now_phase);
    }
    Ok(used)
}
