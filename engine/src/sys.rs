//! The few direct system calls the engine makes, each with its invariant:
//! the io_uring probe, signal handlers, the data-directory lock, fd dup.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGTERM/SIGINT; polled by every core's maintenance task.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Set by SIGHUP; the reload thread reloads keys and certificates.
pub static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::SeqCst);
    } else {
        SHUTDOWN.store(true, Ordering::SeqCst);
    }
}

pub fn install_signal_handlers() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the
        // handler only performs an atomic store, which is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // A client that vanished must not kill the server through SIGPIPE.
    // SAFETY: setting SIGPIPE to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(())
}

/// Checks that this process may create an io_uring; Err names the cause.
pub fn probe_io_uring() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err(
                "io_uring is disabled by the sysctl kernel.io_uring_disabled=2. \
                        Fix: sysctl -w kernel.io_uring_disabled=0"
                    .into(),
            );
        }
    }
    // struct io_uring_params is 120 bytes; zeroed means "no flags".
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes at most sizeof(io_uring_params)
    // bytes through the pointer, and `params` is that large and lives across the call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd is a descriptor this call just created and nothing else owns.
        unsafe { libc::close(fd as RawFd) };
        return Ok(());
    }
    let err = io::Error::last_os_error();
    let why = match err.raw_os_error() {
        Some(libc::ENOSYS) => {
            "the kernel or a seccomp filter does not provide io_uring_setup (ENOSYS)"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "io_uring_setup is not permitted (EPERM): Docker's default seccomp profile blocks it, \
             or kernel.io_uring_disabled=1 restricts it to a group"
        }
        Some(libc::ENOMEM) => {
            "io_uring_setup failed for lack of locked memory (ENOMEM): raise `ulimit -l`"
        }
        _ => "io_uring_setup failed",
    };
    Err(format!(
        "io_uring is unavailable: {why} ({err}). Iris runs its event loops on io_uring. \
         Fix: run on Linux 5.8+ with io_uring allowed; in Docker, start the container with \
         `--security-opt seccomp=unconfined` (or a profile allowing io_uring_setup, io_uring_enter, \
         io_uring_register); check `sysctl kernel.io_uring_disabled` is 0"
    ))
}

/// RLIMIT_MEMLOCK soft limit in bytes (u64::MAX when unlimited).
pub fn memlock_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through a valid pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// An exclusive lock on the data directory, held for the life of the process.
pub struct DirLock {
    _file: std::fs::File,
}

pub fn lock_dir(path: &std::path::Path) -> Result<DirLock, String> {
    let lock_path = path.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "data directory {} is in use by another iris process ({})",
            path.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(DirLock { _file: file })
}

/// A new descriptor for the same open file (closed by whoever owns it next).
pub fn dup(fd: RawFd) -> io::Result<RawFd> {
    // SAFETY: dup has no memory-safety preconditions; an invalid fd gives EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(new)
    }
}

/// Wraps a descriptor we own into a glommio file (closed when it is closed).
pub fn glommio_file(fd: RawFd) -> glommio::io::BufferedFile {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by dup() and is owned by nothing else.
    unsafe { glommio::io::BufferedFile::from_raw_fd(fd) }
}

/// Wraps a socket descriptor we own into a glommio stream (closed with it).
pub fn tcp_stream(fd: RawFd) -> glommio::net::TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: callers pass a descriptor they own (a fresh dup() or one handed
    // over by another core), which nothing else will close.
    unsafe { glommio::net::TcpStream::from_raw_fd(fd) }
}

/// Wraps a listening socket we own (a dup of the process's one listener for
/// that address, engine::ports) into a glommio listener of this core.
pub fn tcp_listener(fd: std::os::fd::OwnedFd) -> glommio::net::TcpListener {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `fd` is bound and listening (glommio's precondition) and owned:
    // into_raw_fd hands its ownership to the glommio listener, which closes it.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// Sends SIGTERM to a process (a child we started).
pub fn terminate(pid: u32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid gives ESRCH.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

/// Wraps a socket descriptor we own (a socketpair end) as a blocking Unix stream.
pub fn unix_stream(fd: RawFd) -> std::os::unix::net::UnixStream {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is a fresh socketpair end that nothing else owns.
    unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) }
}

/// Two glommio streams over one socket (a dup), so reading and writing can
/// wait independently (replication and node links).
pub fn split(
    stream: glommio::net::TcpStream,
) -> io::Result<(glommio::net::TcpStream, glommio::net::TcpStream)> {
    use std::os::fd::AsRawFd;
    let writer = tcp_stream(dup(stream.as_raw_fd())?);
    Ok((stream, writer))
}
