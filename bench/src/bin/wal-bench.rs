//! wal-bench: append and group-commit throughput and latency of the `wal`
//! crate, with the raw fdatasync floor measured in the same run on the same
//! file system. Not a test: run it by hand, record results in BENCHMARKS.md.
//!
//!     cargo run --release -p bench --bin wal-bench -- --records N --size S --batch B --json
//!
//! Phases: (1) raw `pwrite` of one record's bytes + fdatasync on a
//! zero-filled file, (2) N appends with no sync, (3) N appends committed
//! every B records. In `--sync-mode thread` (the engine's shape) a sync
//! thread runs each ticket's fdatasync while the appender goes on; the
//! appender completes a ticket before beginning the next (syncs in flight:
//! 1). `--sync-mode inline` calls the blocking `Wal::sync`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use wal::{SyncTicket, Wal, WalConfig};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum SyncMode {
    Thread,
    Inline,
}

#[derive(Parser, Debug)]
#[command(about = "WAL append and group-commit benchmark")]
struct Args {
    /// Records appended in each phase.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Records per group commit.
    #[arg(long, default_value_t = 1)]
    batch: u64,
    #[arg(long, value_enum, default_value_t = SyncMode::Thread)]
    sync_mode: SyncMode,
    /// Segment size in MiB.
    #[arg(long, default_value_t = 64)]
    segment_mib: u64,
    /// Raw fdatasync samples for the floor.
    #[arg(long, default_value_t = 2000)]
    raw_samples: u64,
    /// Directory for the files (default: a fresh one under the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn us(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// The floor: write one record's worth of bytes into a zero-filled,
/// synced file at advancing offsets and fdatasync, as a B=1 commit would.
fn raw_fdatasync(dir: &Path, write_len: usize, samples: u64) -> Histogram<u64> {
    let path = dir.join("raw-fdatasync.dat");
    let file_len = (write_len as u64 * samples)
        .next_multiple_of(4096)
        .max(1 << 20);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = file_len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    file.sync_all().unwrap();
    let data = vec![0x5au8; write_len];
    let mut latencies = histogram();
    for i in 0..samples {
        let started = Instant::now();
        file.write_at(&data, i * write_len as u64).unwrap();
        file.sync_data().unwrap();
        latencies
            .record(started.elapsed().as_nanos() as u64)
            .unwrap();
    }
    std::fs::remove_file(&path).unwrap();
    latencies
}

fn open_wal(dir: &Path, args: &Args) -> Wal {
    let _ = std::fs::remove_dir_all(dir);
    let mut config = WalConfig::new(dir);
    config.segment_size_bytes = args.segment_mib << 20;
    config.record_payload_len_max = config.record_payload_len_max.max(args.size as u32);
    let (wal, _) = Wal::open(config).unwrap();
    // Let the background preallocation of the next segment finish, as it
    // would long before a server's first rollover.
    std::thread::sleep(Duration::from_millis(200 + 4 * args.segment_mib));
    wal
}

struct Appended {
    elapsed: Duration,
    rollover_waits: u64,
}

fn append_only(dir: &Path, args: &Args, payload: &[u8]) -> Appended {
    let mut wal = open_wal(dir, args);
    let started = Instant::now();
    for _ in 0..args.records {
        wal.append(1, 1, payload).unwrap();
    }
    let elapsed = started.elapsed();
    Appended {
        elapsed,
        rollover_waits: wal.rollover_waits(),
    }
}

struct Committed {
    elapsed: Duration,
    fsyncs: u64,
    commit: Histogram<u64>,
    rollover_waits: u64,
}

fn committed(dir: &Path, args: &Args, payload: &[u8]) -> Committed {
    let mut wal = open_wal(dir, args);
    let (ticket_tx, ticket_rx) = mpsc::channel::<SyncTicket>();
    let (done_tx, done_rx) = mpsc::channel::<(SyncTicket, std::io::Result<()>)>();
    let syncer = std::thread::spawn(move || {
        for ticket in ticket_rx {
            let result = ticket.fdatasync();
            if done_tx.send((ticket, result)).is_err() {
                break;
            }
        }
    });
    let mut commit = histogram();
    let mut fsyncs = 0;
    let mut in_flight: Option<Instant> = None;
    let complete = |wal: &mut Wal, begun: Instant, commit: &mut Histogram<u64>| {
        let (ticket, result) = done_rx.recv().unwrap();
        wal.sync_complete(ticket, result).expect("fdatasync failed");
        commit.record(begun.elapsed().as_nanos() as u64).unwrap();
    };
    let started = Instant::now();
    let mut appended = 0;
    while appended < args.records {
        let batch = args.batch.min(args.records - appended);
        for _ in 0..batch {
            wal.append(1, 1, payload).unwrap();
        }
        appended += batch;
        match args.sync_mode {
            SyncMode::Inline => {
                let begun = Instant::now();
                wal.sync().unwrap();
                commit.record(begun.elapsed().as_nanos() as u64).unwrap();
            }
            SyncMode::Thread => {
                if let Some(begun) = in_flight.take() {
                    complete(&mut wal, begun, &mut commit);
                }
                let ticket = wal.sync_begin().expect("new records to sync");
                in_flight = Some(Instant::now());
                ticket_tx.send(ticket).unwrap();
            }
        }
        fsyncs += 1;
    }
    if let Some(begun) = in_flight.take() {
        complete(&mut wal, begun, &mut commit);
    }
    let elapsed = started.elapsed();
    assert_eq!(wal.durable_position(), args.records);
    drop(ticket_tx);
    syncer.join().unwrap();
    Committed {
        elapsed,
        fsyncs,
        commit,
        rollover_waits: wal.rollover_waits(),
    }
}

fn main() {
    let args = Args::parse();
    assert!(args.records > 0 && args.batch > 0);
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("wal-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir).unwrap();
    let payload: Vec<u8> = (0..args.size).map(|i| i as u8).collect();
    let frame_bytes = wal::format::frame_len(args.size) as u64;

    // The commit phase runs right after the floor, before the append-only
    // phase creates and deletes files (with `discard` mounts, freeing blocks
    // adds work to journal commits that a concurrent fdatasync may wait on).
    let raw = raw_fdatasync(&dir, frame_bytes as usize, args.raw_samples);
    let committed = committed(&dir.join("commit"), &args, &payload);
    let appended = append_only(&dir.join("append"), &args, &payload);
    std::fs::remove_dir_all(&dir).unwrap();

    let appends_per_sec = args.records as f64 / appended.elapsed.as_secs_f64();
    let durable_per_sec = args.records as f64 / committed.elapsed.as_secs_f64();
    let report = serde_json::json!({
        "records": args.records,
        "size": args.size,
        "batch": args.batch,
        "sync_mode": format!("{:?}", args.sync_mode).to_lowercase(),
        "segment_mib": args.segment_mib,
        "frame_bytes": frame_bytes,
        "appends_per_sec": appends_per_sec.round(),
        "append_bytes_per_sec": (appends_per_sec * frame_bytes as f64).round(),
        "durable_per_sec": durable_per_sec.round(),
        "bytes_per_sec": (durable_per_sec * frame_bytes as f64).round(),
        "fsyncs": committed.fsyncs,
        "commit_p50_us": us(&committed.commit, 0.5),
        "commit_p99_us": us(&committed.commit, 0.99),
        "commit_max_us": committed.commit.max() as f64 / 1000.0,
        "raw_fdatasync_p50_us": us(&raw, 0.5),
        "raw_fdatasync_p99_us": us(&raw, 0.99),
        "rollover_waits": appended.rollover_waits + committed.rollover_waits,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    }
}
