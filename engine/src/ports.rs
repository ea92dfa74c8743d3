//! Port ownership (DESIGN: "A port belongs to one process: the cores share it,
//! no other process (nor a dead one's lingering io_uring listeners) ever joins
//! them").
//!
//! Each listening address is ONE socket, made here before the executors start:
//! SO_REUSEADDR (a TIME_WAIT left by a previous run does not block the bind; on
//! Linux it never lets two LISTEN sockets share an address) and no SO_REUSEPORT,
//! so no other socket can join it. Every core accepts on a dup of it.
//!
//! When the address is taken, /proc tells us by whom:
//! - a live process holds the listener: refuse at once, naming it;
//! - no live process holds it: it is a killed process's listener that io_uring
//!   tears down asynchronously (a few hundred ms after kill -9; `ss -ltn` shows
//!   it and it still accepts). Wait for it to go, up to `listen_busy_wait_ms`,
//!   then listen alone. The same wait covers a holder we are not allowed to see
//!   (another user's process), which then ends in a clear error.

use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Pending-connection queue of each listener (what glommio's own bind used).
const LISTEN_BACKLOG: i32 = 1024;
/// Pause between bind attempts while a dead process's listener lingers.
const LISTEN_RETRY: Duration = Duration::from_millis(5);
/// TCP state LISTEN in /proc/net/tcp (include/net/tcp_states.h).
const TCP_LISTEN: &str = "0A";

/// Why an address could not be made ours.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{addr} ({what}) is in use by process {pid}{name}: another iris on this port? Stop it or pick another address")]
    InUse {
        what: &'static str,
        addr: SocketAddr,
        pid: u32,
        /// ` (comm)` of the holder, or ` (this process)`; empty if unknown.
        name: String,
    },
    #[error(
        "{addr} ({what}) is still taken after waiting {waited_ms} ms (listen_busy_wait_ms) for a \
         listener that no live process visible to this user holds; `ss -ltnp` names the holder"
    )]
    StillBusy {
        what: &'static str,
        addr: SocketAddr,
        waited_ms: u64,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// A listening socket on `addr` that only this process holds (nonblocking,
/// close-on-exec). `what` names the listener in errors and logs.
pub fn listen_exclusive(
    addr: SocketAddr,
    what: &'static str,
    busy_wait: Duration,
) -> Result<std::net::TcpListener, ListenError> {
    let started = Instant::now();
    let mut warned = false;
    loop {
        let source = match try_listen(addr) {
            Ok(listener) => {
                if warned {
                    tracing::info!(%addr, what, waited_ms = started.elapsed().as_millis() as u64,
                        "the lingering listener is gone: listening alone");
                }
                return Ok(listener);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => e,
            Err(source) => return Err(ListenError::Io { what, addr, source }),
        };
        // A live holder is final; a dead one's listener goes by itself.
        let holder = holder_of(addr);
        if let Holder::Process(pid) = holder {
            let name = if pid == std::process::id() {
                " (this process)".to_string()
            } else {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| format!(" ({})", c.trim()))
                    .unwrap_or_default()
            };
            return Err(ListenError::InUse {
                what,
                addr,
                pid,
                name,
            });
        }
        let waited = started.elapsed();
        if waited >= busy_wait {
            return Err(ListenError::StillBusy {
                what,
                addr,
                waited_ms: waited.as_millis() as u64,
            });
        }
        if !warned {
            warned = true;
            tracing::warn!(%addr, what, error = %source, holder = ?holder,
                busy_wait_ms = busy_wait.as_millis() as u64,
                "address taken by a listener no live process holds (a killed process's io_uring \
                 listener lingers for a few hundred ms): waiting for it to go");
        }
        std::thread::sleep(LISTEN_RETRY);
    }
}

fn try_listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    // socket2 creates it close-on-exec.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Nonblocking for good: the cores share this one open file, and glommio's
    // accept flips O_NONBLOCK around a first try with F_GETFL/F_SETFL. On a
    // blocking file one core's restore can land between another's flip and its
    // accept4, which then blocks that core's executor thread. Nonblocking from
    // the start makes the flip a no-op; io_uring still waits for connections.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // Two SO_REUSEADDR sockets may both bind; the second listen() is refused.
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Who holds the LISTEN socket(s) on an address, as far as /proc shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Process(u32),
    /// Listening sockets and no process holding them (a dead process's).
    Nobody {
        listeners: usize,
    },
    /// Some holders could not be examined (another user's processes, no /proc).
    Unknown,
}

fn holder_of(addr: SocketAddr) -> Holder {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => inodes.extend(listen_inodes(&text, addr)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // no IPv6
            Err(_) => return Holder::Unknown,
        }
    }
    // A socket whose owner already closed it shows inode 0.
    inodes.remove(&0);
    if inodes.is_empty() {
        return Holder::Nobody { listeners: 0 };
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Holder::Unknown;
    };
    let mut unreadable = false;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let fds = match std::fs::read_dir(entry.path().join("fd")) {
            Ok(fds) => fds,
            // Gone meanwhile: not a holder.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => {
                unreadable = true;
                continue;
            }
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                return Holder::Process(pid);
            }
        }
    }
    if unreadable {
        Holder::Unknown
    } else {
        Holder::Nobody {
            listeners: inodes.len(),
        }
    }
}

/// Inodes of the LISTEN sockets in a /proc/net/tcp{,6} table that conflict
/// with binding `addr`: same port, and the same IP or a wildcard on either side.
fn listen_inodes(table: &str, addr: SocketAddr) -> Vec<u64> {
    let want = canonical(addr.ip());
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != TCP_LISTEN {
                return None;
            }
            let (ip, port) = fields[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = canonical(parse_proc_ip(ip)?);
            let conflicts =
                port == addr.port() && (ip == want || ip.is_unspecified() || want.is_unspecified());
            conflicts.then(|| fields[9].parse().ok()).flatten()
        })
        .collect()
}

/// The kernel prints an address as 32-bit words in host byte order (`%08X` of
/// each `__be32`), so each word's native bytes are the address bytes in order.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn parses_proc_net_tcp_listeners_for_the_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            \x20  0: 0100007F:1C8D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0\n\
            \x20  1: 0200007F:1C8D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0 100 0 0 10 0\n\
            \x20  2: 00000000:1C8D 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0 100 0 0 10 0\n\
            \x20  3: 0100007F:1C8D 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 444 1 0 100 0 0 10 0\n\
            \x20  4: 0100007F:1C8E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0 100 0 0 10 0\n";
        if cfg!(target_endian = "little") {
            let addr: SocketAddr = "127.0.0.1:7309".parse().unwrap();
            // Its own IP and the wildcard, listening, on that port; not 127.0.0.2,
            // not an established connection, not another port.
            assert_eq!(listen_inodes(table, addr), vec![111, 333]);
            let any: SocketAddr = "0.0.0.0:7309".parse().unwrap();
            assert_eq!(listen_inodes(table, any), vec![111, 222, 333]);
        }
        let v6 = "00000000000000000000000001000000";
        if cfg!(target_endian = "little") {
            assert_eq!(parse_proc_ip(v6), Some("::1".parse().unwrap()));
        }
        assert_eq!(parse_proc_ip("zz"), None);
    }

    #[test]
    fn a_live_holder_is_named_and_no_socket_joins_ours() {
        let ours = listen_exclusive(local(), "test", Duration::from_secs(5)).expect("listen");
        let addr = ours.local_addr().unwrap();
        // A second listener of any kind on the same address is refused at once.
        match listen_exclusive(addr, "test", Duration::from_secs(60)) {
            Err(ListenError::InUse { pid, .. }) => assert_eq!(pid, std::process::id()),
            other => panic!("expected InUse, got {other:?}"),
        }
        let rival = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        rival.set_reuse_port(true).unwrap();
        rival.set_reuse_address(true).unwrap();
        let joined = rival.bind(&addr.into()).and_then(|()| rival.listen(16));
        assert!(joined.is_err(), "an SO_REUSEPORT socket joined ours");
    }
}
