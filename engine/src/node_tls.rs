//! Mutual TLS on the links between nodes (replication today).
//!
//! Both ends present a certificate of the cluster CA (`--cluster-ca`,
//! `--node-cert`, `--node-key`; `iris certs` makes development ones). The
//! TLS session runs on a small pump thread per link that moves bytes
//! between the TLS socket and one end of a Unix socketpair; the other end is
//! what the replication code reads and writes, exactly as it would a TCP
//! stream. A peer without a certificate of the cluster CA fails the handshake
//! on the pump thread: not one replication byte of it reaches the cores, so
//! it cannot fence, stream or snapshot anything.
//!
//! Links are few (one per shard and replica) and bounded
//! (`REPLICATION_CONNECTIONS_MAX`), so a thread each is cheap; the pump
//! costs a copy through the socketpair, which plain links do not pay.

#![allow(unsafe_code)]

use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Replication connections (authenticated or in their handshake) a node
/// holds at once; more are closed at accept.
pub const REPLICATION_CONNECTIONS_MAX: usize = 64;
/// Node links from edges (engine::link) a core node holds over mutual TLS
/// at once (a pump thread each).
pub const EDGE_LINKS_MAX: usize = 1024;
/// A peer must finish its TLS handshake within this.
pub const NODE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Plaintext a pump holds for the slower side before it stops reading the faster.
const PUMP_BUFFER_BYTES: usize = 256 << 10;
/// One read from either side (well under the TLS buffer limit, so a write
/// into rustls never comes back short).
const PUMP_READ_BYTES: usize = 16 << 10;
/// How often an idle pump wakes to notice shutdown.
const PUMP_POLL_MS: i32 = 1000;

/// The node's TLS identity and the cluster's CA.
pub struct NodeTls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl NodeTls {
    pub fn load(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<NodeTls, String> {
        let provider = crate::tls::provider();
        let roots = Arc::new(crate::tls::load_roots("cluster CA", ca)?);
        let certs = crate::tls::load_certs(cert)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| format!("cluster CA {}: {e}", ca.display()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), crate::tls::load_key(key)?)
            .map_err(|e| format!("node certificate and key do not go together: {e}"))?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, crate::tls::load_key(key)?)
            .map_err(|e| format!("node certificate and key do not go together: {e}"))?;
        Ok(NodeTls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// Authenticated links waiting for a core to take them (see `Gateway`).
pub struct Inbox {
    links: Mutex<Vec<OwnedFd>>,
    /// Signalled once per link pushed (the cores await it through glommio).
    pub eventfd: OwnedFd,
}

impl Inbox {
    fn new() -> io::Result<Inbox> {
        Ok(Inbox {
            links: Mutex::new(Vec::new()),
            eventfd: crate::sockets::blocking_eventfd()?,
        })
    }

    fn push(&self, fd: OwnedFd) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fd);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Links pushed since the last call.
    pub fn take(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.links.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Counts node connections of one kind against their bound
/// (`REPLICATION_CONNECTIONS_MAX`, `EDGE_LINKS_MAX`).
pub struct LinkCount(Arc<AtomicUsize>);

impl LinkCount {
    pub fn try_new(count: &Arc<AtomicUsize>, max: usize) -> Option<LinkCount> {
        let was = count.fetch_add(1, Ordering::SeqCst);
        if was >= max {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(LinkCount(count.clone()))
    }
}

impl Drop for LinkCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accepts replication connections on `listener` (a thread), completes each
/// mutual TLS handshake on a pump thread, and hands authenticated links to
/// the cores through the returned inbox.
pub fn start_gateway(
    listener: TcpListener,
    tls: Arc<NodeTls>,
    count: Arc<AtomicUsize>,
    max: usize,
    what: &'static str,
) -> Result<Arc<Inbox>, String> {
    // The process's listeners are nonblocking (engine::ports); this thread blocks.
    listener
        .set_nonblocking(false)
        .map_err(|e| format!("{what} listener: {e}"))?;
    let inbox = Arc::new(Inbox::new().map_err(|e| format!("cannot create an eventfd: {e}"))?);
    let out = inbox.clone();
    std::thread::Builder::new()
        .name(format!("iris-{what}-tls"))
        .spawn(move || {
            let mut log = crate::lograte::LogEvery::default();
            loop {
                if crate::sys::SHUTDOWN.load(Ordering::SeqCst) {
                    return;
                }
                let (sock, peer) = match listener.accept() {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, what, "node accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let Some(guard) = LinkCount::try_new(&count, max) else {
                    if let Some(suppressed) = log.check(crate::lograte::REPEATED_ERROR_LOG_INTERVAL) {
                        tracing::warn!(%peer, suppressed, max, what, "node connections at their bound: closed");
                    }
                    continue;
                };
                let (tls, inbox) = (tls.clone(), inbox.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("iris-{what}-pump"))
                    .spawn(move || serve_link(sock, peer, &tls, &inbox, guard));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a replication link thread");
                }
            }
        })
        .map_err(|e| format!("cannot start the replication TLS thread: {e}"))?;
    Ok(out)
}

fn serve_link(sock: TcpStream, peer: SocketAddr, tls: &NodeTls, inbox: &Inbox, _guard: LinkCount) {
    let conn = match ServerConnection::new(tls.server.clone()) {
        Ok(c) => Connection::Server(c),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a TLS session");
            return;
        }
    };
    let (mine, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create a socketpair");
            return;
        }
    };
    let result = handshake(conn, &sock).and_then(|conn| {
        inbox.push(OwnedFd::from(theirs));
        pump(conn, sock, mine)
    });
    if let Err(e) = result {
        tracing::warn!(%peer, error = %e, "node link (TLS) refused or ended");
    }
}

/// Connects to a node at `addr` with mutual TLS; returns the local end of
/// the link at once (the handshake and the pump run on a thread; a failure
/// closes the link, which the caller reads as EOF).
pub fn dial(addr: &str, tls: &Arc<NodeTls>) -> io::Result<RawFd> {
    let (mine, theirs) = UnixStream::pair()?;
    let (addr, tls) = (addr.to_string(), tls.clone());
    std::thread::Builder::new()
        .name("iris-repl-pump".into())
        .spawn(move || {
            if let Err(e) = dial_and_pump(&addr, &tls, theirs) {
                tracing::warn!(primary = %addr, error = %e, "replication link (TLS) failed");
            }
        })?;
    Ok(mine.into_raw_fd())
}

fn dial_and_pump(addr: &str, tls: &NodeTls, pair: UnixStream) -> Result<(), String> {
    let host = net::host_of(addr);
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    let mut last = io::Error::new(ErrorKind::InvalidInput, "no address");
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .find_map(
            |a| match TcpStream::connect_timeout(&a, NODE_HANDSHAKE_TIMEOUT) {
                Ok(s) => Some(s),
                Err(e) => {
                    last = e;
                    None
                }
            },
        )
        .ok_or_else(|| last.to_string())?;
    let conn = ClientConnection::new(tls.client.clone(), name).map_err(|e| e.to_string())?;
    let conn = handshake(Connection::Client(conn), &sock)?;
    pump(conn, sock, pair)
}

fn handshake(mut conn: Connection, sock: &TcpStream) -> Result<Connection, String> {
    let _ = sock.set_nodelay(true);
    sock.set_read_timeout(Some(NODE_HANDSHAKE_TIMEOUT))
        .and_then(|()| sock.set_write_timeout(Some(NODE_HANDSHAKE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + NODE_HANDSHAKE_TIMEOUT;
    let mut s = sock;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return Err("TLS handshake timed out".into());
        }
        conn.complete_io(&mut s)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(conn)
}

/// Moves bytes both ways between the TLS socket and the socketpair end until
/// either side closes or fails.
/// Processes the TLS records rustls holds and moves their plaintext to
/// `to_pair`; true when the peer sent close_notify.
fn take_plaintext(
    conn: &mut Connection,
    buf: &mut [u8],
    to_pair: &mut Vec<u8>,
) -> Result<bool, String> {
    conn.process_new_packets()
        .map_err(|e| format!("TLS: {e}"))?;
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => to_pair.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The peer closed: plaintext it sent before still reaches our side (a
/// WELCOME or REFUSE followed at once by close_notify is the common case).
fn flush_to_pair(pair: &mut UnixStream, to_pair: &[u8]) -> Result<(), String> {
    if to_pair.is_empty() {
        return Ok(());
    }
    pair.set_nonblocking(false).map_err(|e| e.to_string())?;
    let _ = pair.set_write_timeout(Some(NODE_HANDSHAKE_TIMEOUT));
    pair.write_all(to_pair).map_err(|e| e.to_string())
}

fn pump(mut conn: Connection, mut sock: TcpStream, mut pair: UnixStream) -> Result<(), String> {
    let err = |e: io::Error| e.to_string();
    sock.set_nonblocking(true).map_err(err)?;
    pair.set_nonblocking(true).map_err(err)?;
    conn.set_buffer_limit(Some(PUMP_BUFFER_BYTES));
    let mut to_pair: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; PUMP_READ_BYTES];
    // The handshake may have read the peer's first application data along
    // with its last handshake message: it is already inside rustls, and the
    // socket will not turn readable for it. Hand it over before polling.
    if take_plaintext(&mut conn, &mut buf, &mut to_pair)? {
        return flush_to_pair(&mut pair, &to_pair);
    }
    loop {
        if crate::sys::SHUTDOWN.load(Ordering::SeqCst) {
            return Ok(());
        }
        let sock_events = {
            let mut e = 0;
            if to_pair.len() < PUMP_BUFFER_BYTES {
                e |= libc::POLLIN;
            }
            if conn.wants_write() {
                e |= libc::POLLOUT;
            }
            e
        };
        let pair_events = {
            let mut e = 0;
            if !conn.wants_write() {
                e |= libc::POLLIN;
            }
            if !to_pair.is_empty() {
                e |= libc::POLLOUT;
            }
            e
        };
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: sock_events,
                revents: 0,
            },
            libc::pollfd {
                fd: pair.as_raw_fd(),
                events: pair_events,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, PUMP_POLL_MS) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e.to_string());
        }
        let (sock_ready, pair_ready) = (fds[0].revents, fds[1].revents);
        if sock_ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match conn.read_tls(&mut sock) {
                Ok(0) => return flush_to_pair(&mut pair, &to_pair), // the peer closed
                Ok(_) => {
                    if take_plaintext(&mut conn, &mut buf, &mut to_pair)? {
                        // close_notify: what came before it still goes through.
                        return flush_to_pair(&mut pair, &to_pair);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if !to_pair.is_empty() {
            match pair.write(&to_pair) {
                Ok(n) => {
                    to_pair.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        if pair_ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match pair.read(&mut buf) {
                Ok(0) => {
                    conn.send_close_notify();
                    let _ = conn.write_tls(&mut sock);
                    return Ok(());
                }
                Ok(n) => conn.writer().write_all(&buf[..n]).map_err(err)?,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}
