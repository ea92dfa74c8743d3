//! `iris-bench`: load drivers for Iris (and, for comparison, Redis).
//!
//! - `flood`: N idle authenticated connections; server RSS and kernel slab per connection.
//! - `msgs`: C senders with W SENDs in flight; STORED/s, latencies, CPU per message,
//!   exactly-once delivery.
//! - `floor`: loopback round trip and 4 KiB write+fdatasync, the floors of a store-ack.
//!
//! A terminal gets a progress line and a table; `--json` prints one JSON object.
//! Keys and methods: bench/README.md.

use bench::flood::{ChildConfig, FloodConfig, FloodReport};
use bench::floor::{FloorConfig, FloorReport};
use bench::handshake::Proto;
use bench::msgs::{MsgsConfig, MsgsReport};
use bench::stats::{parse_duration, thousands};
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Connecting threads per flood process: a handshake waits on a round trip,
/// not on the CPU, so more threads than cores keep the rate up.
const FLOOD_THREADS_DEFAULT: usize = 8;

#[derive(Parser)]
#[command(
    name = "iris-bench",
    version,
    about = "Load drivers for Iris (and Redis, for comparison)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N idle authenticated connections and measure what they cost.
    Flood(FloodArgs),
    /// Keep W messages in flight on each of C connections; measure throughput and latency.
    Msgs(MsgsArgs),
    /// Measure the loopback round-trip and write+fdatasync floors.
    Floor(FloorArgs),
    /// (internal) One process of a flood.
    #[command(hide = true)]
    FloodChild(FloodChildArgs),
}

/// How the drivers log in and whether they speak TLS (both commands, and
/// the flood's children).
#[derive(Args, Clone)]
struct Login {
    /// HELLO token (empty by default).
    #[arg(long, default_value = "")]
    token: String,
    /// Sign a JWT for each user with this private key (`iris keygen`'s KID.key),
    /// for a server with `--auth jwt`.
    #[arg(long)]
    token_key: Option<PathBuf>,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The name the server's certificate is checked against.
    #[arg(long, default_value = "127.0.0.1")]
    tls_name: String,
}

impl Login {
    fn access(&self) -> Result<bench::handshake::Access, String> {
        bench::handshake::Access::new(
            &self.token,
            self.token_key.as_deref(),
            self.tls_ca.as_deref(),
            &self.tls_name,
        )
    }
}

#[derive(Args)]
struct Common {
    /// Server address (loopback only).
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: String,
    /// Protocol of the server: iris, or redis (LPUSH, the peer comparison).
    #[arg(long, value_enum, default_value = "iris")]
    proto: Proto,
    /// Pid of the server, for its RSS and CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    #[command(flatten)]
    login: Login,
    /// Driver threads (msgs: default one per CPU this process may run on;
    /// flood: connecting threads per process, default 8).
    #[arg(long)]
    threads: Option<usize>,
    /// Per-connection connect + greeting timeout.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FloodArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 15_000)]
    conns: usize,
    /// Child processes (default: as few as the open-files limit allows).
    #[arg(long)]
    procs: Option<usize>,
    /// Connections per second over all processes (0: as fast as they go).
    #[arg(long, default_value_t = 5_000.0)]
    rate: f64,
    /// How long to hold the connections open before measuring.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hold: Duration,
    /// How long to wait after the clients close before the last measurement.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
}

#[derive(Args)]
struct MsgsArgs {
    #[command(flatten)]
    common: Common,
    /// Sending connections (each with its own recipient).
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Messages in flight per sender.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Body bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before it.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Recipients stay away: measure pure durable storing.
    #[arg(long)]
    offline: bool,
    /// Longest wait, after the measured time, for answers and deliveries still due.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// The primary's admin HTTP address: sample replica lag (ms) every 10 ms while measuring.
    #[arg(long)]
    admin: Option<String>,
}

#[derive(Args)]
struct FloorArgs {
    /// Directory for the fdatasync file (use the disk the server's data is on).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Timed loopback round trips.
    #[arg(long, default_value_t = 20_000)]
    rtt_count: usize,
    /// Bytes each way per round trip.
    #[arg(long, default_value_t = 100)]
    rtt_size: usize,
    /// Timed write+fdatasync pairs.
    #[arg(long, default_value_t = 2_000)]
    sync_count: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FloodChildArgs {
    #[arg(long)]
    addr: String,
    #[arg(long, value_enum)]
    proto: Proto,
    #[arg(long)]
    conns: usize,
    #[arg(long)]
    rate: f64,
    #[arg(long)]
    user_prefix: String,
    #[command(flatten)]
    login: Login,
    #[arg(long, value_parser = parse_duration)]
    connect_timeout: Duration,
    #[arg(long, value_parser = parse_duration)]
    hold_max: Duration,
    #[arg(long)]
    threads: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Flood(args) => flood(args),
        Command::Msgs(args) => msgs(args),
        Command::Floor(args) => floor(args),
        Command::FloodChild(args) => flood_child(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iris-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves `addr` and refuses anything but loopback: these drivers flood.
fn loopback_addr(addr: &str) -> Result<SocketAddr, String> {
    let resolved = addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--addr {addr}: no address"))?;
    if !resolved.ip().is_loopback() {
        return Err(format!("--addr {addr}: only loopback addresses are driven"));
    }
    Ok(resolved)
}

fn default_threads() -> usize {
    core_affinity::get_core_ids().map_or(1, |ids| ids.len().max(1))
}

fn progress_wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

fn flood(args: FloodArgs) -> Result<(), String> {
    let c = &args.common;
    let cfg = FloodConfig {
        addr: loopback_addr(&c.addr)?,
        proto: c.proto,
        conns: args.conns,
        procs: args.procs,
        rate: args.rate,
        hold: args.hold,
        settle: args.settle,
        server_pid: c.server_pid,
        token: c.login.token.clone(),
        token_key: c.login.token_key.clone(),
        tls_ca: c.login.tls_ca.clone(),
        tls_name: c.login.tls_name.clone(),
        connect_timeout: c.connect_timeout,
        threads: c.threads.unwrap_or(FLOOD_THREADS_DEFAULT),
        progress: progress_wanted(c.json),
    };
    let report = bench::flood::run(&cfg)?;
    if c.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_flood(&report);
    }
    Ok(())
}

fn flood_child(args: FloodChildArgs) -> Result<(), String> {
    let cfg = ChildConfig {
        addr: loopback_addr(&args.addr)?,
        proto: args.proto,
        conns: args.conns,
        rate: args.rate,
        user_prefix: args.user_prefix,
        access: args.login.access()?,
        connect_timeout: args.connect_timeout,
        hold_max: args.hold_max,
        threads: args.threads,
    };
    bench::flood::run_child(&cfg)
}

fn msgs(args: MsgsArgs) -> Result<(), String> {
    let c = &args.common;
    if args.conns == 0 || args.inflight == 0 {
        return Err("--conns and --inflight must be at least 1".to_string());
    }
    if args.duration.is_zero() {
        return Err("--duration must be above zero".to_string());
    }
    let cfg = MsgsConfig {
        addr: loopback_addr(&c.addr)?,
        proto: c.proto,
        conns: args.conns,
        inflight: args.inflight,
        size: args.size,
        duration: args.duration,
        warmup: args.warmup,
        offline: args.offline,
        server_pid: c.server_pid,
        threads: c.threads.unwrap_or_else(default_threads).max(1),
        access: c.login.access()?,
        drain_timeout: args.drain_timeout,
        connect_timeout: c.connect_timeout,
        progress: progress_wanted(c.json),
        admin: args.admin.as_deref().map(loopback_addr).transpose()?,
    };
    let report = bench::msgs::run(&cfg)?;
    if c.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_msgs(&report);
    }
    Ok(())
}

fn floor(args: FloorArgs) -> Result<(), String> {
    if args.rtt_count == 0 || args.rtt_size == 0 || args.sync_count == 0 {
        return Err("counts and sizes must be at least 1".to_string());
    }
    let cfg = FloorConfig {
        dir: args.dir,
        rtt_count: args.rtt_count,
        rtt_size: args.rtt_size,
        sync_count: args.sync_count,
    };
    let report = bench::floor::run(&cfg)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_floor(&report);
    }
    Ok(())
}

fn row(name: &str, value: String) {
    println!("  {name:<34} {value}");
}

fn opt_us(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.1} µs"))
}

fn opt_bytes(value: Option<u64>) -> String {
    value.map_or("-".to_string(), |v| format!("{} B", thousands(v)))
}

fn print_msgs(r: &MsgsReport) {
    let mode = match (r.proto, r.offline) {
        (Proto::Redis, _) => "redis LPUSH",
        (Proto::Iris, true) => "iris, recipients offline",
        (Proto::Iris, false) => "iris, recipients online",
    };
    println!(
        "msgs: {mode}, C={} W={} S={} B, {} driver thread(s), {:.1} s measured",
        r.conns, r.inflight, r.size, r.driver_threads, r.duration_s
    );
    row(
        "acked (STORED) per second",
        thousands(r.stored_per_sec as u64),
    );
    row("acked in the measured time", thousands(r.stored));
    row(
        "rejected (total)",
        format!("{} {:?}", r.rejected, r.rejected_by_code),
    );
    row("errors", r.errors.to_string());
    for sample in &r.error_samples {
        row("  error", sample.clone());
    }
    row("unanswered at the end", r.unanswered.to_string());
    row(
        "store-ack p50 / p99 / p999 / max",
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1} µs",
            r.ack_p50_us, r.ack_p99_us, r.ack_p999_us, r.ack_max_us
        ),
    );
    if let (Some(p50), Some(p99), Some(p999), Some(max)) =
        (r.e2e_p50_us, r.e2e_p99_us, r.e2e_p999_us, r.e2e_max_us)
    {
        row(
            "send-to-deliver p50 / p99 / p999 / max",
            format!("{p50:.1} / {p99:.1} / {p999:.1} / {max:.1} µs"),
        );
    }
    if let (Some(p50), Some(p99), Some(max)) = (
        r.replica_lag_p50_ms,
        r.replica_lag_p99_ms,
        r.replica_lag_max_ms,
    ) {
        row(
            "replica lag p50 / p99 / max",
            format!("{p50:.1} / {p99:.1} / {max:.1} ms"),
        );
    }
    row("server CPU per message", opt_us(r.server_cpu_us_per_msg));
    row(
        "driver CPU per message",
        format!("{:.2} µs", r.driver_cpu_us_per_msg),
    );
    if let Some(util) = r.server_cpu_util {
        row(
            "server / driver CPU busy",
            format!("{util:.2} / {:.2} cores", r.driver_cpu_util),
        );
    }
    if let Some(ok) = r.exactly_once {
        row(
            "delivered exactly once",
            format!(
                "{ok} ({} delivered, {} missing, {} duplicate, {} unexpected, {} seq gaps)",
                r.delivered,
                r.missing_deliveries,
                r.duplicate_deliveries,
                r.unexpected_deliveries,
                r.seq_gaps
            ),
        );
    }
}

fn print_flood(r: &FloodReport) {
    println!(
        "flood: {:?}, {} connections over {} process(es)",
        r.proto, r.conns, r.procs
    );
    row(
        "connections open / failed",
        format!("{} / {}", r.conns_ok, r.conns_failed),
    );
    for sample in &r.error_samples {
        row("  error", sample.clone());
    }
    row(
        "connect rate",
        format!(
            "{}/s in {:.2} s",
            thousands(r.conns_per_sec as u64),
            r.connect_s
        ),
    );
    row(
        "server RSS before / holding / after",
        format!(
            "{} / {} / {}",
            opt_bytes(r.server_rss_before_bytes),
            opt_bytes(r.server_rss_holding_bytes),
            opt_bytes(r.server_rss_after_bytes)
        ),
    );
    row(
        "server RSS per connection",
        r.server_rss_bytes_per_conn
            .map_or("-".to_string(), |v| format!("{v:.0} B")),
    );
    row(
        "kernel slab before / holding / after",
        format!(
            "{} / {} / {}",
            opt_bytes(Some(r.kernel_slab_before_bytes)),
            opt_bytes(Some(r.kernel_slab_holding_bytes)),
            opt_bytes(Some(r.kernel_slab_after_bytes))
        ),
    );
    row(
        "kernel slab per connection (both ends)",
        format!("{:.0} B", r.kernel_slab_bytes_per_conn),
    );
}

fn print_floor(r: &FloorReport) {
    println!("floor: loopback round trip and durable write on this machine");
    row(
        &format!("loopback TCP round trip, {} B", r.rtt_size),
        format!(
            "p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            r.rtt_p50_us, r.rtt_p99_us, r.rtt_max_us
        ),
    );
    row(
        &format!("{} B write + fdatasync", r.sync_write_bytes),
        format!(
            "p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({})",
            r.fdatasync_p50_us, r.fdatasync_p99_us, r.fdatasync_max_us, r.sync_dir
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_commands() {
        let cli = Cli::try_parse_from([
            "iris-bench",
            "msgs",
            "--addr",
            "127.0.0.1:7070",
            "--conns",
            "64",
            "--inflight",
            "16",
            "--size",
            "100",
            "--duration",
            "10s",
            "--offline",
            "--server-pid",
            "42",
            "--json",
        ])
        .unwrap();
        let Command::Msgs(args) = cli.command else {
            panic!("not msgs");
        };
        assert_eq!((args.conns, args.inflight, args.size), (64, 16, 100));
        assert!(args.offline && args.common.json);
        assert_eq!(args.common.server_pid, Some(42));
        assert_eq!(args.duration, Duration::from_secs(10));

        let cli = Cli::try_parse_from([
            "iris-bench",
            "flood",
            "--conns",
            "15000",
            "--procs",
            "2",
            "--rate",
            "3000",
            "--hold",
            "10",
            "--proto",
            "redis",
        ])
        .unwrap();
        let Command::Flood(args) = cli.command else {
            panic!("not flood");
        };
        assert_eq!(
            (args.conns, args.procs, args.hold),
            (15_000, Some(2), Duration::from_secs(10))
        );
        assert_eq!(args.common.proto, Proto::Redis);
    }

    #[test]
    fn only_loopback_is_driven() {
        assert!(loopback_addr("127.0.0.1:7070").is_ok());
        assert!(loopback_addr("[::1]:7070").is_ok());
        assert!(loopback_addr("10.0.0.1:7070").is_err());
    }
}
