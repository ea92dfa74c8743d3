//! Real-process crash test: a child process (this test binary, re-executed
//! with `WAL_KILL9_CHILD_DIR` set) appends and group-commits as fast as it
//! can and prints each durable position on its stdout pipe; the parent
//! kill -9s it at a random moment, reopens the log and checks that every
//! reported-durable record is there and intact. 24 rounds on one directory,
//! so each round also recovers what the previous kill left.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use wal::sim::SimRng;
use wal::{Wal, WalConfig};

const CHILD_ENV: &str = "WAL_KILL9_CHILD_DIR";
const ROUND_ENV: &str = "WAL_KILL9_ROUND";
const ROUNDS: u64 = 24;
const CHILD_RUNTIME_MAX: Duration = Duration::from_secs(20);

fn config(dir: &str) -> WalConfig {
    let mut config = WalConfig::new(dir);
    config.segment_size_bytes = 1 << 20; // roll often
    config.record_payload_len_max = 4096;
    config
}

/// The child's body. A no-op when run as an ordinary test.
#[test]
fn kill9_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let (mut wal, _) = Wal::open(config(&dir)).unwrap();
    let mut rng = SimRng::new(round);
    let mut out = std::io::stdout().lock();
    let started = Instant::now();
    while started.elapsed() < CHILD_RUNTIME_MAX {
        for _ in 0..1 + rng.below(64) {
            let position = wal.last_position() + 1;
            assert_eq!(
                wal.append(round, 3, &payload_for(position)).unwrap(),
                position
            );
        }
        let durable = wal.sync().unwrap();
        writeln!(out, "DURABLE {durable}").unwrap();
        out.flush().unwrap();
        // Keep the disk bounded as a consumer would: exercises retention too.
        wal.retain_from(durable.saturating_sub(20_000)).unwrap();
    }
}

#[test]
fn kill9_at_random_moments_loses_no_durable_record() {
    let dir = temp_dir("kill9");
    let dir_str = dir.to_str().unwrap().to_string();
    let exe = std::env::current_exe().unwrap();
    let mut rng = SimRng::new(std::process::id() as u64);
    let mut records_checked = 0;
    for round in 1..=ROUNDS {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir_str)
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let durable = Arc::new(AtomicU64::new(0));
        let reader = {
            let durable = durable.clone();
            let stdout = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(position) = line.strip_prefix("DURABLE ") {
                        durable.fetch_max(position.parse().unwrap(), Ordering::SeqCst);
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20 + rng.below(200)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let durable = durable.load(Ordering::SeqCst);
        let (wal, report) =
            Wal::open(config(&dir_str)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            report.last_position >= durable,
            "round {round}: {report}, but {durable} was reported durable"
        );
        assert!(
            report.first_position <= durable.saturating_sub(20_000).max(1),
            "round {round}: {report}"
        );
        let mut expected = report.first_position;
        for record in wal.iter_from(report.first_position).unwrap() {
            let record = record.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(record.position, expected);
            assert!(record.epoch <= round && record.record_type == 3);
            assert_eq!(
                record.payload,
                payload_for(expected),
                "round {round}: record {expected}"
            );
            expected += 1;
        }
        assert_eq!(expected, report.last_position + 1);
        eprintln!("round {round}: durable {durable}, {report}");
        records_checked += report.records;
    }
    assert!(records_checked > 0, "the child never got to append");
    std::fs::remove_dir_all(&dir).unwrap();
}
