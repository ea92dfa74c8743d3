//! Real storage: one preallocated, zero-filled file per segment, read
//! through a read-only mmap and written with pwrite,
//! named `<base position, 20 digits>.wal`, plus a background thread that
//! prepares the next segment so a rollover is a rename, not a 64 MiB write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memmap2::Mmap;

use crate::limits::{SEGMENT_CREATE_RETRY_MS, ZERO_FILL_CHUNK_BYTES};
use crate::mmap::map_segment;
use crate::storage::{SegmentFile, Storage};
use crate::WalError;

const SEGMENT_SUFFIX: &str = ".wal";
const SPARE_SUFFIX: &str = ".spare";
const LOCK_FILE: &str = "LOCK";
/// How long opening waits for a lock another process holds (see `open`).
pub const LOCK_WAIT: Duration = Duration::from_secs(3);
/// How often the lock is tried meanwhile.
const LOCK_RETRY: Duration = Duration::from_millis(10);

pub struct FileSegment {
    file: File,
    map: Mmap,
}

impl SegmentFile for FileSegment {
    #[inline]
    fn bytes(&self) -> &[u8] {
        &self.map
    }
    fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        assert!(
            offset + data.len() <= self.map.len(),
            "write past the segment end"
        );
        self.file.write_all_at(data, offset as u64)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

/// A segment file prepared ahead of time under a temporary name.
struct Spare {
    path: PathBuf,
    size_bytes: u64,
    segment: FileSegment,
}

struct Preallocator {
    requests: Option<Sender<(PathBuf, u64)>>,
    spares: Receiver<io::Result<Spare>>,
    thread: Option<JoinHandle<()>>,
}

pub struct FileStorage {
    dir: PathBuf,
    dir_file: File,
    _lock: File,
    populate: bool,
    preallocator: Option<Preallocator>,
    spare_requested_size_bytes: Option<u64>,
    spare_counter: u64,
    rollover_waits: u64,
    /// The last failed segment creation: until `SEGMENT_CREATE_RETRY_MS`
    /// after it, creations fail at once with its error kind.
    create_failed: Option<(Instant, io::ErrorKind, String)>,
}

impl FileStorage {
    /// Opens (creating if needed) and locks the WAL directory, and removes
    /// spares left by an earlier process.
    pub fn open(dir: &Path, populate: bool, background: bool) -> Result<Self, WalError> {
        fs::create_dir_all(dir).map_err(WalError::io(format!("create {}", dir.display())))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(WalError::io(format!("open {}", lock_path.display())))?;
        // A process killed with -9 can still hold its lock for a moment after
        // it was reaped (the fault tests saw it right after kill -9: the
        // kernel tears a dead process's io_uring down on a worker of its own
        // afterwards). So a lock taken is waited for (at most LOCK_WAIT)
        // before it is an error.
        let waited_since = Instant::now();
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if waited_since.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(LOCK_RETRY)
                }
                Err(e) => {
                    return Err(WalError::Io {
                        context: format!(
                            "lock {} (is another process using this WAL?)",
                            lock_path.display()
                        ),
                        source: io::Error::other(e.to_string()),
                    })
                }
            }
        }
        let dir_file = File::open(dir).map_err(WalError::io(format!("open {}", dir.display())))?;
        for entry in fs::read_dir(dir).map_err(WalError::io(format!("list {}", dir.display())))? {
            let path = entry.map_err(WalError::io("read dir entry"))?.path();
            if path.to_string_lossy().ends_with(SPARE_SUFFIX) {
                fs::remove_file(&path)
                    .map_err(WalError::io(format!("remove {}", path.display())))?;
            }
        }
        let preallocator = background.then(|| Preallocator::start(populate));
        Ok(FileStorage {
            dir: dir.to_path_buf(),
            dir_file,
            _lock: lock,
            populate,
            preallocator,
            spare_requested_size_bytes: None,
            spare_counter: 0,
            rollover_waits: 0,
            create_failed: None,
        })
    }

    fn next_spare_path(&mut self) -> PathBuf {
        self.spare_counter += 1;
        self.dir
            .join(format!("{:06}{SPARE_SUFFIX}", self.spare_counter))
    }

    /// Asks the background thread for the next segment ahead of need.
    fn request_spare(&mut self, size_bytes: u64) {
        if self.spare_requested_size_bytes.is_some() || self.preallocator.is_none() {
            return;
        }
        let path = self.next_spare_path();
        let preallocator = self.preallocator.as_ref().expect("checked above");
        if let Some(requests) = &preallocator.requests {
            if requests.send((path, size_bytes)).is_ok() {
                self.spare_requested_size_bytes = Some(size_bytes);
            }
        }
    }

    /// The requested spare, if one was requested with this size.
    fn take_spare(&mut self, size_bytes: u64) -> io::Result<Option<Spare>> {
        let Some(requested) = self.spare_requested_size_bytes.take() else {
            return Ok(None);
        };
        let preallocator = self.preallocator.as_ref().expect("a spare was requested");
        let spare = match preallocator.spares.try_recv() {
            Ok(spare) => spare,
            Err(TryRecvError::Empty) => {
                self.rollover_waits += 1;
                preallocator
                    .spares
                    .recv()
                    .map_err(|_| io::Error::other("preallocator gone"))?
            }
            Err(TryRecvError::Disconnected) => return Err(io::Error::other("preallocator gone")),
        }?;
        assert_eq!(spare.size_bytes, requested);
        if requested != size_bytes {
            fs::remove_file(&spare.path)?;
            return Ok(None);
        }
        Ok(Some(spare))
    }
}

impl FileStorage {
    fn create_segment_now(&mut self, base: u64, size_bytes: u64) -> io::Result<FileSegment> {
        let spare = match self.take_spare(size_bytes)? {
            Some(spare) => spare,
            None => {
                let path = self.next_spare_path();
                make_spare(&path, size_bytes, self.populate)?
            }
        };
        if let Err(e) = fs::rename(&spare.path, self.segment_path(base)) {
            let _ = fs::remove_file(&spare.path);
            return Err(e);
        }
        self.request_spare(size_bytes);
        Ok(spare.segment)
    }
}

impl Preallocator {
    fn start(populate: bool) -> Preallocator {
        let (request_tx, request_rx) = mpsc::channel::<(PathBuf, u64)>();
        let (spare_tx, spare_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("wal-prealloc".into())
            .spawn(move || {
                for (path, size_bytes) in request_rx {
                    let spare = make_spare(&path, size_bytes, populate);
                    if spare_tx.send(spare).is_err() {
                        let _ = fs::remove_file(&path);
                        break;
                    }
                }
            })
            .expect("spawn wal-prealloc thread");
        Preallocator {
            requests: Some(request_tx),
            spares: spare_rx,
            thread: Some(thread),
        }
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        if let Some(mut preallocator) = self.preallocator.take() {
            preallocator.requests = None;
            if let Some(thread) = preallocator.thread.take() {
                let _ = thread.join();
            }
            while let Ok(Ok(spare)) = preallocator.spares.try_recv() {
                let _ = fs::remove_file(&spare.path);
            }
        }
    }
}

/// Creates a zero-filled file of `size_bytes` whose zeros and length are
/// durable, then maps it. Zero-filled rather than fallocate'd: the first
/// write into an fallocate'd extent makes fdatasync also commit the extent
/// conversion (notes/wal-facts.md: 67 µs vs 87 µs).
fn make_spare(path: &Path, size_bytes: u64, populate: bool) -> io::Result<Spare> {
    let result = make_spare_file(path, size_bytes, populate);
    if result.is_err() {
        // A full disk must not leave a file per attempt behind.
        let _ = fs::remove_file(path);
    }
    result
}

fn make_spare_file(path: &Path, size_bytes: u64, populate: bool) -> io::Result<Spare> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // Written back chunk by chunk as it goes: a final fsync of 64 MiB of
    // dirty zeros would queue the live segment's commits behind all of it
    // (fdatasyncs of 10-50 ms while a segment was being prepared).
    let zeros = vec![0u8; ZERO_FILL_CHUNK_BYTES];
    let mut offset = 0;
    while offset < size_bytes {
        let n = (size_bytes - offset).min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        crate::mmap::write_back_range(file.as_raw_fd(), offset, n as u64)?;
        offset += n as u64;
    }
    file.sync_all()?;
    let map = map_segment(&file, populate)?;
    assert_eq!(map.len() as u64, size_bytes);
    Ok(Spare {
        path: path.to_path_buf(),
        size_bytes,
        segment: FileSegment { file, map },
    })
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl Storage for FileStorage {
    type Segment = FileSegment;

    fn list_segments(&mut self) -> io::Result<Vec<u64>> {
        let mut bases = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(base) = name.to_str().and_then(parse_segment_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        Ok(bases)
    }

    fn open_segment(&mut self, base: u64) -> io::Result<FileSegment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.segment_path(base))?;
        let map = map_segment(&file, self.populate)?;
        Ok(FileSegment { file, map })
    }

    fn create_segment(&mut self, base: u64, size_bytes: u64) -> io::Result<FileSegment> {
        let retry = Duration::from_millis(SEGMENT_CREATE_RETRY_MS);
        if let Some((at, kind, why)) = &self.create_failed {
            if at.elapsed() < retry {
                return Err(io::Error::new(
                    *kind,
                    format!("{why} (less than {SEGMENT_CREATE_RETRY_MS} ms ago; not retried yet)"),
                ));
            }
        }
        let result = self.create_segment_now(base, size_bytes);
        self.create_failed = match &result {
            Ok(_) => None,
            Err(e) => Some((Instant::now(), e.kind(), e.to_string())),
        };
        result
    }

    fn remove_segment(&mut self, base: u64) -> io::Result<()> {
        fs::remove_file(self.segment_path(base))
    }

    fn sync_segment(&mut self, segment: &FileSegment) -> io::Result<()> {
        segment.file.sync_data()
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        self.dir_file.sync_all()
    }

    fn dir_fd(&self) -> Option<RawFd> {
        Some(self.dir_file.as_raw_fd())
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        self.dir.join(format!("{base:020}{SEGMENT_SUFFIX}"))
    }

    fn prepare_segment(&mut self, size_bytes: u64) {
        self.request_spare(size_bytes);
    }

    fn spare_bytes(&self) -> u64 {
        self.spare_requested_size_bytes.unwrap_or(0)
    }

    fn rollover_waits(&self) -> u64 {
        self.rollover_waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_parse_strictly() {
        assert_eq!(parse_segment_name("00000000000000000001.wal"), Some(1));
        assert_eq!(parse_segment_name("1.wal"), None);
        assert_eq!(parse_segment_name("00000000000000000001.spare"), None);
        assert_eq!(parse_segment_name("0000000000000000000x.wal"), None);
    }

    #[test]
    fn a_held_lock_is_waited_for_then_refused() {
        let dir = std::env::temp_dir().join(format!("iris-wal-lock-{}", std::process::id()));
        let first = FileStorage::open(&dir, false, false).expect("first open");
        // flock conflicts between two open files of one process too.
        let started = Instant::now();
        let err = FileStorage::open(&dir, false, false).err().expect("locked");
        assert!(
            started.elapsed() >= LOCK_WAIT,
            "waited {:?}",
            started.elapsed()
        );
        assert!(err.to_string().contains("another process"), "{err}");
        // Released while a second open waits: the second open gets it.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let second = FileStorage::open(&dir, false, false).expect("taken once released");
        release.join().unwrap();
        drop(second);
        fs::remove_dir_all(&dir).unwrap();
    }
}
