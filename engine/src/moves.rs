//! Slot moves, a core node's part (docs/CLUSTER.md, moving slots): the
//! admin API asks for one step at a time (`MoveDesk::run`, on the control
//! thread) and every core carries it out on its shard in its maintenance
//! tick (`tick`), answering once what it wrote is committed (durable, and
//! acknowledged by the replica when the pair has one).
//!
//! The steps, as `iris admin move-slots` drives them:
//! 1. source: `Decide(v, range, owner S, handoff T)`: the range takes no
//!    more SENDs there (edges keep them; they answer RETRY).
//! 2. source: `Export`: each shard's part, once its log is committed.
//! 3. target: `Import`: each shard takes its users' records (after a DROP
//!    of the range, so a re-run starts clean).
//! 4. target: `Decide(v, range, owner T)`: it serves the range once the
//!    decision is committed; edges hear MOVED and send the range there.
//! 5. source: `Decide(v, range, owner T)`, then `Drop`.

use crate::core::{shard_of_slot, Core};
use crate::record::{self, Decoded, SlotsRecord};
use crate::slots::SlotTable;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long one step may take on the cores before the admin request fails
/// (503; the step may still finish, and running it again is safe).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const STEP_POLL: Duration = Duration::from_millis(5);

#[derive(Debug)]
pub enum Step {
    /// Shard 0 logs the decision. One that gives this pair the range takes
    /// effect only once committed: a crash before then must not leave a
    /// node serving a range its log does not say it owns.
    Decide(SlotsRecord),
    /// Each shard's users and dedup entries of the range (the range must be
    /// handed off here), once everything logged before is committed.
    Export { first: u16, last: u16 },
    /// Each shard imports its part of the exported records.
    Import {
        first: u16,
        last: u16,
        records: Arc<Vec<u8>>,
    },
    /// Each shard forgets the range (it is served elsewhere now).
    Drop { first: u16, last: u16 },
}

/// Per core: the step it is on and what it is waiting for.
#[derive(Default)]
struct CoreStep {
    id: u64,
    /// Committed position awaited, the answer then, and a decision to
    /// apply to the table then.
    waiting: Option<(u64, Vec<u8>, Option<SlotsRecord>)>,
    result: Option<Result<Vec<u8>, String>>,
}

#[derive(Default)]
struct Desk {
    id: u64,
    step: Option<Arc<Step>>,
    cores: Vec<CoreStep>,
}

/// Where the admin API leaves a step for the cores and collects answers.
#[derive(Default)]
pub struct MoveDesk {
    desk: Mutex<Desk>,
    /// A core node's slot table and pair (set at start; None elsewhere).
    pub node: OnceLock<(Arc<SlotTable>, u16)>,
}

impl MoveDesk {
    /// Runs one step on all `nr_cores` cores; their answers by core.
    /// Err(409-worthy) when another step is running.
    pub async fn run(&self, step: Step, nr_cores: usize) -> Result<Vec<Vec<u8>>, StepError> {
        {
            let mut d = self.desk.lock().expect("move desk");
            if d.step.is_some() {
                return Err(StepError::Busy);
            }
            d.id += 1;
            d.step = Some(Arc::new(step));
            d.cores = (0..nr_cores).map(|_| CoreStep::default()).collect();
        }
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            tokio::time::sleep(STEP_POLL).await;
            let mut d = self.desk.lock().expect("move desk");
            if d.cores.iter().all(|c| c.result.is_some()) {
                d.step = None;
                let mut out = Vec::new();
                for (core, c) in d.cores.iter_mut().enumerate() {
                    match c.result.take().expect("all answered") {
                        Ok(bytes) => out.push(bytes),
                        Err(e) => return Err(StepError::Failed(format!("core {core}: {e}"))),
                    }
                }
                return Ok(out);
            }
            if Instant::now() >= deadline {
                d.step = None;
                return Err(StepError::Timeout);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("another slot move step is running on this node")]
    Busy,
    #[error("the step did not finish in {STEP_TIMEOUT:?}; running it again is safe")]
    Timeout,
    #[error("{0}")]
    Failed(String),
}

/// A core's part of the current step (called every maintenance tick).
pub fn tick(c: &mut Core, desk: &MoveDesk) {
    let id = c.edge.id as usize;
    let (step_id, step) = {
        let d = desk.desk.lock().expect("move desk");
        let Some(step) = d.step.clone() else { return };
        let Some(mine) = d.cores.get(id) else { return };
        if mine.id == d.id && mine.waiting.is_none() {
            return; // answered
        }
        (d.id, step)
    };
    let mut d = desk.desk.lock().expect("move desk");
    if d.cores[id].id != step_id {
        d.cores[id].id = step_id;
        drop(d);
        let started = start(c, &step);
        d = desk.desk.lock().expect("move desk");
        if d.id != step_id {
            return; // abandoned meanwhile (timeout)
        }
        match started {
            Ok(waiting) => d.cores[id].waiting = Some(waiting),
            Err(e) => d.cores[id].result = Some(Err(e)),
        }
        c.kick_committer();
    }
    let entry = &mut d.cores[id];
    let Some((position, _, _)) = &entry.waiting else {
        return;
    };
    if c.shard.commit_position() < *position {
        return;
    }
    let (_, answer, settle) = entry.waiting.take().expect("checked");
    if let Some(r) = settle {
        c.shard.settle_slots(&r);
    }
    entry.result = Some(Ok(answer));
}

/// Does the step's writes on this core's shard; returns the position to
/// wait for, the answer and a decision to apply once it is committed.
#[allow(clippy::type_complexity)]
fn start(c: &mut Core, step: &Step) -> Result<(u64, Vec<u8>, Option<SlotsRecord>), String> {
    let shard = &mut c.shard;
    if !shard.exists() {
        return Ok((0, Vec::new(), None));
    }
    let now = shard.wal().last_position();
    match step {
        Step::Decide(r) => {
            if shard.id != 0 {
                return Ok((0, Vec::new(), None));
            }
            let (position, settle) = shard.write_slots(r).map_err(|e| e.to_string())?;
            Ok((position, Vec::new(), settle))
        }
        Step::Export { first, last } => {
            let bytes = shard
                .export_slots(*first, *last)
                .map_err(|e| e.to_string())?;
            Ok((now, bytes, None))
        }
        Step::Import {
            first,
            last,
            records,
        } => {
            let nr_cores = c.edge.nr_cores;
            let mine = part_of(records, shard.id, nr_cores)?;
            let position = shard
                .import_slots(*first, *last, &mine)
                .map_err(|e| e.to_string())?;
            Ok((position, Vec::new(), None))
        }
        Step::Drop { first, last } => {
            let position = shard.drop_slots(*first, *last).map_err(|e| e.to_string())?;
            Ok((position, Vec::new(), None))
        }
    }
}

/// The exported records for shard `shard` of `nr_cores`: the users whose
/// slot maps there, and the dedup entries of those slots (an entry of an
/// unknown slot goes to every shard).
fn part_of(records: &[u8], shard: usize, nr_cores: usize) -> Result<Vec<u8>, String> {
    let here = |slot: u16| {
        slot == record::SLOT_UNKNOWN || usize::from(shard_of_slot(slot, nr_cores)) == shard
    };
    let mut out = Vec::new();
    let mut all = record::framed(records);
    for (record_type, payload) in all.by_ref() {
        let keep = match record::decode(record_type, payload).map_err(|e| e.to_string())? {
            Decoded::Msg(m) => here(net::slot_of(m.recipient)),
            Decoded::Ack { recipient, .. } => here(net::slot_of(recipient)),
            Decoded::Dedup(entries) => {
                let mine: Vec<_> = entries.into_iter().filter(|e| here(e.slot)).collect();
                if !mine.is_empty() {
                    let mut payload = Vec::new();
                    record::encode_dedup(&mine, &mut payload);
                    record::push_framed(&mut out, record::DEDUP2, &payload);
                }
                false
            }
            _ => return Err(format!("record type {record_type} in a slot export")),
        };
        if keep {
            record::push_framed(&mut out, record_type, payload);
        }
    }
    if !all.rest.is_empty() {
        return Err("exported records cut short".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_splits_by_the_targets_shards() {
        let users: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
        let mut records = Vec::new();
        let mut payload = Vec::new();
        for u in &users {
            record::encode_ack(u, 0, &mut payload);
            record::push_framed(&mut records, record::ACK, &payload);
        }
        let entries = [0u16, 16383, record::SLOT_UNKNOWN].map(|slot| record::DedupEntry {
            sender_hash: 1,
            msg_id: [slot as u8; 16],
            stored_ms: 2,
            slot,
        });
        record::encode_dedup(&entries, &mut payload);
        record::push_framed(&mut records, record::DEDUP2, &payload);
        let parts: Vec<Vec<u8>> = (0..2).map(|s| part_of(&records, s, 2).unwrap()).collect();
        let count = |part: &[u8], ty: u8| record::framed(part).filter(|(t, _)| *t == ty).count();
        assert_eq!(
            count(&parts[0], record::ACK) + count(&parts[1], record::ACK),
            40
        );
        assert!(count(&parts[0], record::ACK) > 0 && count(&parts[1], record::ACK) > 0);
        // Slot 0 and the unknown slot on shard 0; 16383 and the unknown on shard 1.
        for part in &parts {
            let mut seen = Vec::new();
            for (t, p) in record::framed(part) {
                if let Ok(Decoded::Dedup(e)) = record::decode(t, p) {
                    seen.extend(e.iter().map(|e| e.slot));
                }
            }
            assert_eq!(seen.len(), 2, "{seen:?}");
            assert!(seen.contains(&record::SLOT_UNKNOWN));
        }
        assert!(part_of(&records[..records.len() - 1], 0, 2).is_err());
    }
}
