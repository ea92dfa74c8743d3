//! A full disk costs a bounded number of files and log lines, loses no
//! acknowledged message, and heals by itself once space returns.
//!
//! The data directory sits on a real tmpfs of a few MiB mounted for the test
//! (the test runs as root, as on the project's machines and CI); the full
//! disk is the kernel's ENOSPC, not a simulation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{collect_and_ack, connect, new_msg_id, next_event, reject_code, Event, Server};

const SEGMENT_BYTES: u64 = 1 << 20;
const BODY_LEN: usize = 32 * 1024;
/// SENDs tried against the full disk.
const REJECTED_TRIES: usize = 300;

/// A tmpfs mounted at a fresh directory, unmounted on drop.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(size_bytes: u64) -> SmallFs {
        let dir = std::env::temp_dir().join(format!("iris-disk-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (this test needs root, as the project's machines give)",
            dir.display()
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            names.extend(files_in(&path));
        } else {
            names.push(path.display().to_string());
        }
    }
    names
}

/// SENDs one body; Ok(()) on STORED, Err(code, reason) on REJECTED.
fn try_send(client: &mut tests::Client, body: &[u8]) -> Result<(), (u16, String)> {
    let msg_id = new_msg_id();
    client.send(msg_id, "bob", body).expect("send");
    client.flush().expect("flush");
    match next_event(client) {
        Event::Stored { msg_id: id } if id == msg_id => Ok(()),
        Event::Rejected {
            msg_id: id,
            code,
            reason,
        } if id == msg_id => Err((code, reason)),
        other => panic!("expected STORED or REJECTED, got {other:?}"),
    }
}

#[test]
fn disk_full_is_bounded_and_heals_when_space_returns() {
    let fs = SmallFs::mount(8 << 20);
    let data = fs.dir.join("data");
    // Room the test gives back later.
    let filler = fs.dir.join("filler");
    std::fs::write(&filler, vec![1u8; 2 << 20]).expect("filler");
    let segment = SEGMENT_BYTES.to_string();
    let mut server = Server::start_in(&data, &["--cores", "1", "--wal-segment-bytes", &segment]);
    let (mut alice, _) = connect(server.addr(), "alice");
    let body = vec![b'm'; BODY_LEN];

    // Fill until the disk refuses.
    let mut stored = 0u64;
    let (code, reason) = loop {
        match try_send(&mut alice, &body) {
            Ok(()) => stored += 1,
            Err(rejection) => break rejection,
        }
        assert!(stored < 10_000, "an 8 MiB disk never filled");
    };
    assert_eq!(code, reject_code::UNAVAILABLE, "{reason}");
    assert_eq!(reason, "storage unavailable");
    let files_at_full = files_in(&data).len();

    // Hammer the full disk: every SEND is refused, and that costs neither files nor log lines.
    let log_before = server.log_tail_full().len();
    // Spread over seconds, so the server retries the disk many times.
    for _ in 0..REJECTED_TRIES {
        let (code, _) = try_send(&mut alice, &body).expect_err("the disk is still full");
        assert_eq!(code, reject_code::UNAVAILABLE);
        std::thread::sleep(Duration::from_millis(5));
    }
    let files = files_in(&data);
    assert!(
        files.len() <= files_at_full + 1,
        "{} files after {REJECTED_TRIES} refusals (was {files_at_full}): {files:?}",
        files.len()
    );
    let spares = files.iter().filter(|f| f.ends_with(".spare")).count();
    assert!(spares <= 1, "spare files left behind: {files:?}");
    let log = server.log_tail_full();
    let new_lines: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert!(
        new_lines.len() <= 3,
        "{} ERROR lines for {REJECTED_TRIES} refusals:\n{}",
        new_lines.len(),
        new_lines.join("\n")
    );

    // Space returns: the server heals by itself (no restart).
    std::fs::remove_file(&filler).expect("remove filler");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_send(&mut alice, &body) {
            Ok(()) => {
                stored += 1;
                break;
            }
            Err((code, _)) => assert_eq!(code, reject_code::UNAVAILABLE),
        }
        assert!(
            Instant::now() < deadline,
            "never recovered after space returned"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Nothing acknowledged was lost, before or after the full disk, also across a restart.
    drop(alice);
    assert!(server.terminate().success(), "{}", server.log_tail());
    server.restart();
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, stored);
    let delivered = collect_and_ack(&mut bob, stored as usize);
    assert!(delivered.iter().all(|d| d.body == body));
    drop(bob);
    drop(server);
    drop(fs);
}
