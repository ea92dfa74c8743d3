//! `iris-bench flood`: open N authenticated connections, hold them idle, and
//! measure what they cost the server (RSS from /proc/PID/status) and the kernel
//! (Slab from /proc/meminfo), before, while holding, and after they close.
//!
//! The connections are spread over P child processes (this binary re-run as
//! the hidden `flood-child` command), so each stays under the open-files
//! limit. A child connects its share at its share of the rate, prints one JSON
//! line (`ChildReady`), holds until the parent writes a line on its stdin (or
//! its stdin closes, or its own deadline passes), then closes everything.

use crate::conn::Stream;
use crate::handshake::{self, Proto};
use crate::procfs;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// File descriptors a child keeps for itself besides its connections.
const CHILD_FDS_SPARE: u64 = 64;
/// Error messages a child reports as samples.
const ERROR_SAMPLES_MAX: usize = 5;
/// Longest a child waits for its parent's word after connecting, past the hold.
const CHILD_HOLD_SLACK: Duration = Duration::from_secs(120);
/// Time a child's connect phase may take beyond twice its paced length.
const CONNECT_SLACK: Duration = Duration::from_secs(60);
/// Longest the parent waits for a child to exit after telling it to close.
const CHILD_EXIT_WAIT_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct FloodConfig {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub conns: usize,
    /// Child processes; `None`: as few as the open-files limit allows.
    pub procs: Option<usize>,
    /// Connections per second over all children; 0 means as fast as they go.
    pub rate: f64,
    pub hold: Duration,
    pub settle: Duration,
    pub server_pid: Option<u32>,
    pub token: String,
    /// Sign a JWT per user with this private key (Iris `--auth jwt`).
    pub token_key: Option<std::path::PathBuf>,
    /// Connect over TLS, trusting this CA (with `tls_name` as the server's name).
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_name: String,
    pub connect_timeout: Duration,
    pub threads: usize,
    pub progress: bool,
}

/// Everything `flood` reports; the keys are documented in bench/README.md.
#[derive(Debug, Serialize)]
pub struct FloodReport {
    pub mode: &'static str,
    pub proto: Proto,
    pub conns: usize,
    pub procs: usize,
    pub conns_ok: u64,
    pub conns_failed: u64,
    pub error_samples: Vec<String>,
    pub connect_s: f64,
    pub conns_per_sec: f64,
    pub hold_s: f64,
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_holding_bytes: Option<u64>,
    pub server_rss_after_bytes: Option<u64>,
    pub server_rss_bytes_per_conn: Option<f64>,
    pub kernel_slab_before_bytes: u64,
    pub kernel_slab_holding_bytes: u64,
    pub kernel_slab_after_bytes: u64,
    pub kernel_slab_bytes_per_conn: f64,
}

/// The line a child prints once its connections are open.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildReady {
    pub ok: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    pub error_samples: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct ChildConfig {
    pub addr: SocketAddr,
    pub proto: Proto,
    pub conns: usize,
    pub rate: f64,
    pub user_prefix: String,
    pub access: crate::handshake::Access,
    pub connect_timeout: Duration,
    pub hold_max: Duration,
    pub threads: usize,
}

/// Children needed so each stays under the open-files limit.
pub fn procs_needed(conns: usize, open_files_max: u64) -> usize {
    let per_child = open_files_max.saturating_sub(CHILD_FDS_SPARE).max(1) as usize;
    conns.div_ceil(per_child).max(1)
}

pub fn run(cfg: &FloodConfig) -> Result<FloodReport, String> {
    let open_files = procfs::open_files_max().map_err(|e| format!("open files limit: {e}"))?;
    let procs = cfg
        .procs
        .unwrap_or_else(|| procs_needed(cfg.conns, open_files))
        .max(1);
    let rss = |pid: u32| procfs::rss_bytes(pid).map_err(|e| format!("server rss: {e}"));
    let slab = || procfs::slab_bytes().map_err(|e| format!("slab: {e}"));
    let rss_before = cfg.server_pid.map(rss).transpose()?;
    let slab_before = slab()?;

    let started = Instant::now();
    let mut children = spawn_children(cfg, procs)?;
    let ready = collect_ready(&mut children, cfg.progress)?;
    let connect_s = started.elapsed().as_secs_f64();
    let conns_ok: u64 = ready.iter().map(|r| r.ok).sum();
    let conns_failed: u64 = ready.iter().map(|r| r.failed).sum();
    let error_samples = ready
        .iter()
        .flat_map(|r| r.error_samples.iter().cloned())
        .take(ERROR_SAMPLES_MAX)
        .collect();
    if cfg.progress {
        eprintln!(
            "{conns_ok} connections open, {conns_failed} failed; holding {:?}",
            cfg.hold
        );
    }

    std::thread::sleep(cfg.hold);
    let rss_holding = cfg.server_pid.map(rss).transpose()?;
    let slab_holding = slab()?;
    close_children(children)?;
    std::thread::sleep(cfg.settle);
    let rss_after = cfg.server_pid.map(rss).transpose()?;
    let slab_after = slab()?;

    let per_conn = |before: u64, holding: u64| {
        if conns_ok == 0 {
            0.0
        } else {
            (holding as f64 - before as f64) / conns_ok as f64
        }
    };
    Ok(FloodReport {
        mode: "flood",
        proto: cfg.proto,
        conns: cfg.conns,
        procs,
        conns_ok,
        conns_failed,
        error_samples,
        connect_s,
        conns_per_sec: conns_ok as f64 / connect_s,
        hold_s: cfg.hold.as_secs_f64(),
        server_rss_before_bytes: rss_before,
        server_rss_holding_bytes: rss_holding,
        server_rss_after_bytes: rss_after,
        server_rss_bytes_per_conn: rss_before.zip(rss_holding).map(|(b, h)| per_conn(b, h)),
        kernel_slab_before_bytes: slab_before,
        kernel_slab_holding_bytes: slab_holding,
        kernel_slab_after_bytes: slab_after,
        kernel_slab_bytes_per_conn: per_conn(slab_before, slab_holding),
    })
}

fn spawn_children(cfg: &FloodConfig, procs: usize) -> Result<Vec<(Child, ChildStdout)>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 % 1_000_000_000)
        .unwrap_or(0);
    let mut children = Vec::with_capacity(procs);
    for p in 0..procs {
        let share = cfg.conns / procs + usize::from(p < cfg.conns % procs);
        let hold_max = cfg.hold + CHILD_HOLD_SLACK;
        let mut child = Command::new(&exe)
            .arg("flood-child")
            .args(["--addr", &cfg.addr.to_string()])
            .args(["--proto", proto_name(cfg.proto)])
            .args(["--conns", &share.to_string()])
            .args(["--rate", &(cfg.rate / procs as f64).to_string()])
            .args(["--user-prefix", &format!("f{nonce}-{p}-")])
            .args(["--token", &cfg.token])
            .args(
                cfg.token_key
                    .iter()
                    .flat_map(|k| [std::ffi::OsStr::new("--token-key"), k.as_os_str()]),
            )
            .args(
                cfg.tls_ca
                    .iter()
                    .flat_map(|k| [std::ffi::OsStr::new("--tls-ca"), k.as_os_str()]),
            )
            .args(["--tls-name", &cfg.tls_name])
            .args([
                "--connect-timeout",
                &format!("{}ms", cfg.connect_timeout.as_millis()),
            ])
            .args(["--hold-max", &format!("{}ms", hold_max.as_millis())])
            .args(["--threads", &cfg.threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn flood-child: {e}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        children.push((child, stdout));
    }
    Ok(children)
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Iris => "iris",
        Proto::Redis => "redis",
    }
}

/// Reads each child's ready line. Bounded: a child gives up connecting by its
/// own deadline and always prints its line (or exits, which ends the read).
fn collect_ready(
    children: &mut [(Child, ChildStdout)],
    progress: bool,
) -> Result<Vec<ChildReady>, String> {
    let mut ready = Vec::with_capacity(children.len());
    for (p, (_, stdout)) in children.iter_mut().enumerate() {
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("child {p}: {e}"))?;
        let parsed: ChildReady = serde_json::from_str(line.trim())
            .map_err(|e| format!("child {p} said {line:?}: {e}"))?;
        if progress {
            eprintln!(
                "child {p}: {} open, {} failed in {:.2}s",
                parsed.ok, parsed.failed, parsed.elapsed_s
            );
        }
        ready.push(parsed);
    }
    Ok(ready)
}

fn close_children(children: Vec<(Child, ChildStdout)>) -> Result<(), String> {
    let mut running = Vec::with_capacity(children.len());
    for (mut child, _stdout) in children {
        if let Some(mut stdin) = child.stdin.take() {
            // A child that already left cannot be told; it closed its sockets.
            let _ = stdin.write_all(b"close\n");
        }
        running.push(child);
    }
    let deadline = Instant::now() + CHILD_EXIT_WAIT_MAX;
    for mut child in running {
        loop {
            match child.try_wait().map_err(|e| format!("wait: {e}"))? {
                Some(_) => break,
                None if Instant::now() >= deadline => {
                    // Only our own child, by its handle.
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    Ok(())
}

/// The child side: connect, report, hold, close.
pub fn run_child(cfg: &ChildConfig) -> Result<(), String> {
    let started = Instant::now();
    let threads = cfg.threads.clamp(1, cfg.conns.max(1));
    let (tx, rx) = mpsc::channel::<(Vec<Stream>, u64, Vec<String>)>();
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let cfg = cfg.clone();
        let tx = tx.clone();
        handles.push(std::thread::spawn(move || {
            let _ = tx.send(connect_share(&cfg, t, threads, started));
        }));
    }
    drop(tx);
    let mut streams = Vec::with_capacity(cfg.conns);
    let mut failed = 0;
    let mut error_samples = Vec::new();
    for (opened, fails, errors) in rx {
        streams.extend(opened);
        failed += fails;
        let room = ERROR_SAMPLES_MAX.saturating_sub(error_samples.len());
        error_samples.extend(errors.into_iter().take(room));
    }
    for handle in handles {
        handle
            .join()
            .map_err(|_| "connect thread panicked".to_string())?;
    }
    let ready = ChildReady {
        ok: streams.len() as u64,
        failed,
        elapsed_s: started.elapsed().as_secs_f64(),
        error_samples,
    };
    let line = serde_json::to_string(&ready).map_err(|e| e.to_string())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|_| stdout.flush())
        .map_err(|e| e.to_string())?;
    wait_for_parent(cfg.hold_max);
    drop(streams);
    Ok(())
}

/// Connection `i` of this child goes to thread `i % threads`, at `rate` per
/// second over the whole child.
fn connect_share(
    cfg: &ChildConfig,
    t: usize,
    threads: usize,
    started: Instant,
) -> (Vec<Stream>, u64, Vec<String>) {
    let mut opened = Vec::with_capacity(cfg.conns / threads + 1);
    let mut failed = 0;
    let mut errors = Vec::new();
    let paced_s = if cfg.rate > 0.0 {
        cfg.conns as f64 / cfg.rate
    } else {
        0.0
    };
    let deadline = started + Duration::from_secs_f64(paced_s * 2.0) + CONNECT_SLACK;
    for i in (t..cfg.conns).step_by(threads) {
        if Instant::now() >= deadline {
            failed += 1;
            if errors.len() < ERROR_SAMPLES_MAX {
                errors.push(format!(
                    "connection {i}: not attempted, connect phase over time"
                ));
            }
            continue;
        }
        if cfg.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / cfg.rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let user = format!("{}{i}", cfg.user_prefix);
        match handshake::connect(cfg.addr, cfg.proto, &user, &cfg.access, cfg.connect_timeout) {
            Ok((stream, _)) => opened.push(stream),
            Err(e) => {
                failed += 1;
                if errors.len() < ERROR_SAMPLES_MAX {
                    errors.push(format!("{user}: {e}"));
                }
            }
        }
    }
    (opened, failed, errors)
}

/// Returns when the parent writes a line, closes our stdin, or `hold_max` passes.
fn wait_for_parent(hold_max: Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(hold_max);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_connections_under_the_open_files_limit() {
        assert_eq!(procs_needed(15_000, 20_000), 1);
        assert_eq!(procs_needed(19_936, 20_000), 1);
        assert_eq!(procs_needed(19_937, 20_000), 2);
        assert_eq!(procs_needed(50_000, 20_000), 3);
        assert_eq!(procs_needed(0, 20_000), 1);
        assert_eq!(procs_needed(10, 1), 10);
    }
}
