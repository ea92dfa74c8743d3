//! Simulated storage for the durability tests. Each file keeps the bytes
//! written apart from the bytes synced, and the directory keeps the names
//! created apart from the names synced. `SimDisk::crash` then leaves what a
//! power cut would: the synced state plus, at random, a torn prefix of the
//! unsynced tail of each file.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::rc::Rc;

use crate::storage::{SegmentFile, Storage};

/// A small, seeded, reproducible generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct Inode {
    written: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Default)]
pub struct SimDisk {
    inodes: Vec<Inode>,
    dir_written: BTreeMap<u64, usize>,
    dir_synced: BTreeMap<u64, usize>,
    /// The next sync (file or directory) fails, as an EIO would.
    pub fail_next_sync: bool,
    /// The next segment write fails after writing the first half of its
    /// bytes, as an EIO or ENOSPC partway through a pwrite would.
    pub fail_next_write: bool,
    pub syncs: u64,
}

impl SimDisk {
    pub fn new() -> Rc<RefCell<SimDisk>> {
        Rc::new(RefCell::new(SimDisk::default()))
    }

    /// Power cut. Call after the `Wal` using this disk is dropped (its open
    /// segments hand their written bytes back to the disk on drop).
    /// Returns how many unsynced bytes survived as torn tails.
    pub fn crash(&mut self, rng: &mut SimRng) -> u64 {
        // The file system's journal may or may not have committed the
        // namespace changes made since the last directory sync.
        if rng.chance(50) {
            self.dir_written = self.dir_synced.clone();
        } else {
            self.dir_synced = self.dir_written.clone();
        }
        let mut survived = 0;
        for inode in &mut self.inodes {
            let first = inode
                .written
                .iter()
                .zip(&inode.synced)
                .position(|(w, s)| w != s);
            if let Some(first) = first {
                let last = inode
                    .written
                    .iter()
                    .zip(&inode.synced)
                    .rposition(|(w, s)| w != s);
                let span = last.expect("a first difference implies a last") - first + 1;
                let kept = rng.below(span as u64 + 1) as usize;
                survived += kept as u64;
                inode.synced[first..first + kept]
                    .copy_from_slice(&inode.written[first..first + kept]);
                inode.written.copy_from_slice(&inode.synced);
            }
        }
        survived
    }

    /// Direct access for tests that damage files on purpose.
    pub fn file_mut(&mut self, base: u64) -> Option<&mut Vec<u8>> {
        let inode = *self.dir_written.get(&base)?;
        Some(&mut self.inodes[inode].written)
    }

    /// Makes every written byte and name durable (a clean shutdown).
    pub fn sync_everything(&mut self) {
        self.dir_synced = self.dir_written.clone();
        for inode in &mut self.inodes {
            inode.synced.clone_from(&inode.written);
        }
    }

    pub fn segment_bases(&self) -> Vec<u64> {
        self.dir_written.keys().copied().collect()
    }

    fn take_failure(&mut self) -> io::Result<()> {
        self.syncs += 1;
        if std::mem::take(&mut self.fail_next_sync) {
            return Err(io::Error::other("injected sync failure"));
        }
        Ok(())
    }
}

/// `Storage` over a shared `SimDisk`.
#[derive(Clone)]
pub struct SimStorage {
    pub disk: Rc<RefCell<SimDisk>>,
}

impl SimStorage {
    pub fn new(disk: Rc<RefCell<SimDisk>>) -> Self {
        SimStorage { disk }
    }
}

pub struct SimSegment {
    inode: usize,
    data: Vec<u8>,
    disk: Rc<RefCell<SimDisk>>,
}

impl Drop for SimSegment {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        self.disk.borrow_mut().inodes[self.inode].written = data;
    }
}

impl SegmentFile for SimSegment {
    fn bytes(&self) -> &[u8] {
        &self.data
    }
    /// Lands in `data`, the written-not-synced view (the page cache), as a
    /// pwrite would; only a sync copies it to the synced bytes.
    fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        let fail = std::mem::take(&mut self.disk.borrow_mut().fail_next_write);
        let len = if fail { data.len() / 2 } else { data.len() };
        self.data[offset..offset + len].copy_from_slice(&data[..len]);
        if fail {
            return Err(io::Error::other("injected write failure"));
        }
        Ok(())
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

fn not_found(base: u64) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("sim segment {base}"))
}

impl Storage for SimStorage {
    type Segment = SimSegment;

    fn list_segments(&mut self) -> io::Result<Vec<u64>> {
        Ok(self.disk.borrow().segment_bases())
    }

    fn open_segment(&mut self, base: u64) -> io::Result<SimSegment> {
        let disk = self.disk.borrow();
        let inode = *disk.dir_written.get(&base).ok_or_else(|| not_found(base))?;
        let data = disk.inodes[inode].written.clone();
        Ok(SimSegment {
            inode,
            data,
            disk: self.disk.clone(),
        })
    }

    fn create_segment(&mut self, base: u64, size_bytes: u64) -> io::Result<SimSegment> {
        let mut disk = self.disk.borrow_mut();
        let zeros = vec![0u8; size_bytes as usize];
        // Like FileStorage: the zero fill is durable before the file is used.
        disk.inodes.push(Inode {
            written: zeros.clone(),
            synced: zeros.clone(),
        });
        let inode = disk.inodes.len() - 1;
        disk.dir_written.insert(base, inode);
        Ok(SimSegment {
            inode,
            data: zeros,
            disk: self.disk.clone(),
        })
    }

    fn remove_segment(&mut self, base: u64) -> io::Result<()> {
        let mut disk = self.disk.borrow_mut();
        disk.dir_written
            .remove(&base)
            .map(|_| ())
            .ok_or_else(|| not_found(base))
    }

    fn sync_segment(&mut self, segment: &SimSegment) -> io::Result<()> {
        let mut disk = self.disk.borrow_mut();
        disk.take_failure()?;
        let inode = &mut disk.inodes[segment.inode];
        inode.synced.copy_from_slice(&segment.data);
        inode.written.copy_from_slice(&segment.data);
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        let mut disk = self.disk.borrow_mut();
        disk.take_failure()?;
        disk.dir_synced = disk.dir_written.clone();
        Ok(())
    }

    fn dir_fd(&self) -> Option<RawFd> {
        None
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        PathBuf::from(format!("sim/{base:020}.wal"))
    }
}
