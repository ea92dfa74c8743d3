//! Seeded property test on the simulated disk: random sequences of appends,
//! group commits (blocking and begin/complete), failed syncs, flushes of the
//! staging buffer (some failing halfway, as a pwrite can), retention,
//! truncation, copy-forward, power cuts and reopens. After every reopen:
//! every record reported durable is back intact and in order, nothing comes
//! back that was never written, and positions continue without a gap.
//!
//! A failure prints its seed; `WAL_SIM_SEED=<seed> cargo test -p wal
//! --release --test sim_crash` replays exactly that sequence.
//! `WAL_SIM_SEQUENCES` changes how many sequences run (default 10,000).

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use wal::sim::{SimDisk, SimRng};
use wal::{SyncTicket, WalConfig, WalError};

const SEQUENCES_DEFAULT: u64 = 10_000;
const SEED_BASE: u64 = 0x1215_0000;
const SEGMENT_SIZES_BYTES: [u64; 4] = [4096, 8192, 16384, 65536];

/// What the test knows was written, and what it was promised.
struct Model {
    /// Every record that may be in the log, by position.
    records: BTreeMap<u64, (u64, u8, Vec<u8>)>,
    last_position: u64,
    durable_position: u64,
    /// Highest position the test ever said it still needed.
    lowest_needed_position: u64,
    epoch: u64,
}

struct Run {
    rng: SimRng,
    disk: std::rc::Rc<std::cell::RefCell<SimDisk>>,
    config: WalConfig,
    wal: Option<SimWal>,
    tickets: Vec<SyncTicket>,
    model: Model,
}

impl Run {
    fn wal(&mut self) -> &mut SimWal {
        self.wal.as_mut().expect("open")
    }

    fn append(&mut self) -> Result<(), String> {
        let len = self
            .rng
            .below(self.config.record_payload_len_max as u64 + 1) as usize;
        let payload: Vec<u8> = (0..len).map(|_| self.rng.next_u64() as u8).collect();
        if self.rng.chance(5) {
            self.model.epoch += 1;
        }
        let epoch = self.model.epoch.max(self.wal().last_epoch());
        let record_type = self.rng.below(256) as u8;
        match self.wal().append(epoch, record_type, &payload) {
            Ok(position) => {
                check(
                    position == self.model.last_position + 1,
                    format!(
                        "append returned {position} after {}",
                        self.model.last_position
                    ),
                )?;
                self.model.last_position = position;
                self.model
                    .records
                    .insert(position, (epoch, record_type, payload));
                Ok(())
            }
            Err(WalError::Poisoned) => Ok(()),
            // The staging buffer was full and writing it failed.
            Err(WalError::SyncFailed(_)) => check(
                self.wal().is_poisoned(),
                "write failed but not poisoned".into(),
            ),
            Err(e) => Err(format!("append: {e}")),
        }
    }

    fn durable(&mut self, result: Result<u64, WalError>) -> Result<(), String> {
        match result {
            Ok(durable) => {
                check(
                    durable >= self.model.durable_position,
                    format!("durable went back to {durable}"),
                )?;
                check(
                    durable <= self.model.last_position,
                    format!("durable {durable} past last"),
                )?;
                self.model.durable_position = durable;
                Ok(())
            }
            Err(WalError::SyncFailed(_)) | Err(WalError::Poisoned) => check(
                self.wal().is_poisoned(),
                "sync failed but not poisoned".into(),
            ),
            Err(e) => Err(format!("sync: {e}")),
        }
    }

    /// Writes the staged records; sometimes the write fails halfway.
    fn flush(&mut self) -> Result<(), String> {
        self.disk.borrow_mut().fail_next_write = self.rng.chance(5);
        let result = self.wal().flush();
        self.disk.borrow_mut().fail_next_write = false;
        match result {
            Ok(()) => Ok(()),
            Err(WalError::SyncFailed(_)) | Err(WalError::Poisoned) => check(
                self.wal().is_poisoned(),
                "write failed but not poisoned".into(),
            ),
            Err(e) => Err(format!("flush: {e}")),
        }
    }

    fn complete_ticket(&mut self) -> Result<(), String> {
        if self.tickets.is_empty() {
            return Ok(());
        }
        let ticket = self
            .tickets
            .remove(self.rng.below(self.tickets.len() as u64) as usize);
        self.disk.borrow_mut().fail_next_sync = self.rng.chance(3);
        let result = self.wal().sync_perform(&ticket);
        self.disk.borrow_mut().fail_next_sync = false;
        let result = self.wal().sync_complete(ticket, result);
        self.durable(result)
    }

    fn retain(&mut self) -> Result<(), String> {
        let wal = self.wal.as_mut().expect("open");
        let lowest = wal.first_position()
            + self
                .rng
                .below(wal.last_position() + 2 - wal.first_position());
        if wal.retain_from(lowest).is_ok() {
            self.model.lowest_needed_position = self.model.lowest_needed_position.max(lowest);
        }
        check(
            self.wal().first_position() <= lowest.max(self.wal().first_position()),
            "retained".into(),
        )
    }

    fn truncate(&mut self) -> Result<(), String> {
        let wal = self.wal.as_mut().expect("open");
        let first = wal.first_position();
        let position = first - 1 + self.rng.below(wal.last_position() + 2 - first);
        match wal.truncate_after(position) {
            Ok(()) => {
                let position = position.min(self.model.last_position);
                self.model.records.retain(|&p, _| p <= position);
                self.model.last_position = position;
                self.model.durable_position = self.model.durable_position.min(position);
                check(self.wal().last_position() == position, "truncate".into())
            }
            Err(WalError::Poisoned) | Err(WalError::SyncFailed(_)) => Ok(()),
            Err(e) => Err(format!("truncate_after({position}): {e}")),
        }
    }

    fn copy_forward(&mut self) -> Result<(), String> {
        let mut moves = Vec::new();
        let keep_percent = self.rng.below(100);
        let seed = self.rng.next_u64();
        let result = self.wal().copy_forward(
            |r| (r.position ^ seed) % 100 < keep_percent,
            |old, new| moves.push((old, new)),
        );
        let epoch = self.wal().last_epoch();
        match result {
            Ok(_) => {
                for (old, new) in moves {
                    let (_, record_type, payload) = self.model.records[&old].clone();
                    check(
                        new == self.model.last_position + 1,
                        format!("copy landed at {new}"),
                    )?;
                    self.model
                        .records
                        .insert(new, (epoch, record_type, payload));
                    self.model.last_position = new;
                }
                Ok(())
            }
            Err(WalError::Poisoned) => Ok(()),
            Err(e) => Err(format!("copy_forward: {e}")),
        }
    }

    /// Power cut, then reopen and check everything the model knows.
    fn crash_and_reopen(&mut self) -> Result<(), String> {
        self.tickets.clear();
        self.wal = None;
        self.disk.borrow_mut().crash(&mut self.rng);
        let (wal, report) =
            open_sim(&self.disk, &self.config).map_err(|e| format!("reopen: {e}"))?;
        let model = &mut self.model;
        check(
            report.last_position >= model.durable_position,
            format!(
                "lost durable records: {report}, durable {}",
                model.durable_position
            ),
        )?;
        check(
            report.last_position <= model.last_position,
            format!("records never written came back: {report}"),
        )?;
        check(
            report.first_position <= model.lowest_needed_position.max(1),
            format!("a needed segment was deleted: {report}"),
        )?;
        let mut expected = report.first_position;
        for record in wal
            .iter_from(report.first_position)
            .map_err(|e| e.to_string())?
        {
            let record = record.map_err(|e| format!("read after reopen: {e}"))?;
            check(record.position == expected, format!("gap at {expected}"))?;
            let (epoch, record_type, payload) = model
                .records
                .get(&expected)
                .ok_or(format!("record {expected} never written"))?;
            let same = record.epoch == *epoch
                && record.record_type == *record_type
                && record.payload == &payload[..];
            check(
                same,
                format!("record {expected} differs from what was written"),
            )?;
            expected += 1;
        }
        check(
            expected == report.last_position + 1,
            "iterator stopped early".into(),
        )?;
        model.records.retain(|&p, _| p <= report.last_position);
        model.last_position = report.last_position;
        model.durable_position = report.last_position;
        check(
            wal.durable_position() == report.last_position,
            "reopen not durable".into(),
        )?;
        self.wal = Some(wal);
        Ok(())
    }
}

fn check(ok: bool, what: String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what)
    }
}

fn run_sequence(seed: u64) -> Result<(), String> {
    let mut rng = SimRng::new(seed);
    let mut config = sim_config(SEGMENT_SIZES_BYTES[rng.below(4) as usize]);
    config.record_payload_len_max = 64 + rng.below(448) as u32;
    config.syncs_in_flight_max = 1 + rng.below(3) as u32;
    // From one largest frame up to more than a segment: staging-full writes
    // happen often in some sequences and never in others.
    let frame_max = wal::format::frame_len(config.record_payload_len_max as usize);
    config.staging_bytes_max = frame_max + rng.below(2 * config.segment_size_bytes) as usize;
    let disk = SimDisk::new();
    let (wal, _) = open_sim(&disk, &config).map_err(|e| e.to_string())?;
    let model = Model {
        records: BTreeMap::new(),
        last_position: 0,
        durable_position: 0,
        lowest_needed_position: 0,
        epoch: 1,
    };
    let mut run = Run {
        rng,
        disk,
        config,
        wal: Some(wal),
        tickets: Vec::new(),
        model,
    };
    let steps = 20 + run.rng.below(120);
    for _ in 0..steps {
        match run.rng.below(100) {
            0..=51 => run.append()?,
            52..=54 => run.flush()?,
            55..=62 => {
                run.disk.borrow_mut().fail_next_sync = run.rng.chance(2);
                let result = run.wal().sync();
                run.disk.borrow_mut().fail_next_sync = false;
                run.durable(result)?;
            }
            63..=72 => {
                if let Some(ticket) = run.wal().sync_begin() {
                    run.tickets.push(ticket);
                }
            }
            73..=82 => run.complete_ticket()?,
            83..=86 => run.retain()?,
            87..=88 => run.truncate()?,
            89..=91 => run.copy_forward()?,
            _ => run.crash_and_reopen()?,
        }
    }
    run.crash_and_reopen()
}

#[test]
fn random_sequences_survive_power_cuts() {
    let seeds: Vec<u64> = match std::env::var("WAL_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("WAL_SIM_SEED is a u64")],
        Err(_) => {
            let count = std::env::var("WAL_SIM_SEQUENCES")
                .map_or(SEQUENCES_DEFAULT, |n| n.parse().expect("a count"));
            (SEED_BASE..SEED_BASE + count).collect()
        }
    };
    for seed in seeds {
        let outcome = catch_unwind(AssertUnwindSafe(|| run_sequence(seed)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(what)) => panic!("sequence failed: {what}\nreplay: WAL_SIM_SEED={seed} cargo test -p wal --release --test sim_crash"),
            Err(_) => panic!("sequence panicked\nreplay: WAL_SIM_SEED={seed} cargo test -p wal --release --test sim_crash"),
        }
    }
}
