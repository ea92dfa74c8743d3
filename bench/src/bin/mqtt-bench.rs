//! `mqtt-bench`: QoS 1 PUBLISH load on any MQTT 3.1.1 broker, for the
//! comparison of Iris's `--mqtt-listen` with Mosquitto (bench/mqtt/compare.sh,
//! BENCHMARKS.md) on the same load shape.
//!
//! C connections (one thread each, blocking sockets: the same driver cost
//! for every broker), each keeping W QoS 1 PUBLISHes of S bytes in flight:
//! a new one as soon as a PUBACK comes. Sender `s<run>-<i>` publishes to
//! `inbox/r<run>-<i>` (an Iris inbox; on Mosquitto a topic without
//! subscribers). Phases: warm-up (not counted), the measured `--duration`
//! (PUBACKs counted and their latency, PUBLISH written to PUBACK read,
//! recorded), then the connections stop. One JSON object on stdout.
//!
//! Every frame goes through the `mqtt` codec the server uses; only loopback
//! addresses are accepted.

use bench::stats::{parse_duration, LatencyHist};
use clap::Parser;
use mqtt::{Connect, Packet, Publish, QoS};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections a run may open (one thread each).
const CONNS_MAX: usize = 1024;
/// PUBLISHes one connection may keep in flight (distinct packet ids).
const INFLIGHT_MAX: usize = 4096;
/// Read timeout of a connection: a broker silent this long fails the run.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Connections, each with its own sender (one thread each).
    #[arg(long, default_value_t = 64)]
    conns: usize,
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

/// What one connection counted.
#[derive(Default)]
struct ConnReport {
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
    let threads: Vec<_> = (0..args.conns)
        .map(|i| {
            let (phase, failed) = (phase.clone(), failed.clone());
            let (addr, inflight, size) = (args.addr, args.inflight, args.size);
            let password = args.password.clone();
            std::thread::spawn(move || {
                let user = format!("s{run}-{i}");
                let topic = format!("inbox/r{run}-{i}");
                let mut report = ConnReport::default();
                let result = drive(
                    addr,
                    &user,
                    &password,
                    &topic,
                    inflight,
                    size,
                    &phase,
                    &mut report,
                );
                if let Err(e) = result {
                    report.error = Some(format!("{user}: {e}"));
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
        let report = t.join().expect("a connection thread panicked");
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
    if !(1..=INFLIGHT_MAX).contains(&args.inflight) {
        return Err(format!("--inflight must be 1..={INFLIGHT_MAX}"));
    }
    if args.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    Ok(())
}

/// One connection: CONNECT, then W PUBLISHes in flight until the phase is STOP.
#[allow(clippy::too_many_arguments)]
fn drive(
    addr: SocketAddr,
    user: &str,
    password: &str,
    topic: &str,
    inflight: usize,
    size: usize,
    phase: &AtomicU8,
    report: &mut ConnReport,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let limits = mqtt::Limits::default();
    let mut out = Vec::new();
    mqtt::encode(
        &Packet::Connect(Connect {
            clean_session: true,
            keep_alive: 60,
            client_id: user,
            will: None,
            username: Some(user),
            password: Some(password.as_bytes()),
        }),
        &mut out,
    );
    stream.write_all(&out).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    match next_packet(&mut stream, &mut buf, &limits)? {
        Owned::ConnAck(0) => {}
        other => return Err(format!("CONNECT answered {}", other.describe())),
    }
    let payload = vec![b'x'; size];
    let mut sent_at: HashMap<u16, (Instant, u8)> = HashMap::default();
    let mut next_id: u16 = 0;
    let mut publish = |sent_at: &mut HashMap<u16, (Instant, u8)>, out: &mut Vec<u8>| {
        loop {
            next_id = next_id.wrapping_add(1).max(1);
            if !sent_at.contains_key(&next_id) {
                break;
            }
        }
        mqtt::encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic,
                packet_id: next_id,
                payload: &payload,
            }),
            out,
        );
        sent_at.insert(next_id, (Instant::now(), phase.load(Ordering::Relaxed)));
    };
    out.clear();
    for _ in 0..inflight {
        publish(&mut sent_at, &mut out);
    }
    stream.write_all(&out).map_err(|e| format!("write: {e}"))?;
    loop {
        let now_phase = phase.load(Ordering::Relaxed);
        if now_phase == PHASE_STOP {
            let mut bye = Vec::new();
            mqtt::encode(&Packet::Disconnect, &mut bye);
            let _ = stream.write_all(&bye);
            return Ok(());
        }
        match next_packet(&mut stream, &mut buf, &limits)? {
            Owned::PubAck(id) => {
                let (at, sent_phase) = sent_at
                    .remove(&id)
                    .ok_or_else(|| format!("PUBACK for packet id {id} not in flight"))?;
                report.pubacks_total += 1;
                if sent_phase == PHASE_MEASURE && now_phase == PHASE_MEASURE {
                    report.pubacks_measured += 1;
                    report.latency.record_ns(at.elapsed().as_nanos() as u64);
                }
                out.clear();
                publish(&mut sent_at, &mut out);
                stream.write_all(&out).map_err(|e| format!("write: {e}"))?;
            }
            other => return Err(format!("unexpected {}", other.describe())),
        }
    }
}

/// A packet the driver expects, owned.
#[derive(Debug)]
enum Owned {
    ConnAck(u8),
    PubAck(u16),
    Other(mqtt::PacketType),
}

impl Owned {
    fn describe(&self) -> String {
        match self {
            Owned::ConnAck(code) => format!("CONNACK {code}"),
            Owned::PubAck(id) => format!("PUBACK {id}"),
            Owned::Other(kind) => format!("{kind:?}"),
        }
    }
}

fn next_packet(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limits: &mqtt::Limits,
) -> Result<Owned, String> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match mqtt::decode(buf, limits) {
            Ok(Some((packet, used))) => {
                let owned = match packet {
                    Packet::ConnAck(c) => Owned::ConnAck(c.code as u8),
                    Packet::PubAck { packet_id } => Owned::PubAck(packet_id),
                    other => Owned::Other(other.packet_type()),
                };
                buf.drain(..used);
                return Ok(owned);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("bad bytes from the broker: {e}")),
        }
        let n = stream.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the broker closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
