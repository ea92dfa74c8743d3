//! Blocking `std::net` client: the CLI, the end-to-end tests and simple tools
//! use it. Not for the data path of the server (that is the event loop's job).
//!
//! The one hard part is pipelining. A client that writes thousands of SENDs
//! before reading can fill its socket while the server, in turn, is blocked
//! writing STOREDs back to it: both sides wait on each other forever. So a
//! write that would block reads whatever the server has sent into a bounded
//! queue, and `recv` hands that queue out first.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::codec::DecodeError;
use crate::codec::{decode_server_frame, encode_client_frame, ClientFrame, MsgId, ServerFrame};
use crate::limits::{Limits, FRAME_HEADER_LEN, PROTOCOL_VERSION, STR_LEN_MAX, TOKEN_WIRE_LEN_MAX};

/// `send` flushes once this many bytes are buffered: big enough to batch
/// many small SENDs per syscall, small enough to keep the pipe moving.
pub const WRITE_BUF_FLUSH_AT: usize = 64 * 1024;
/// Initial read buffer; it grows (up to one max frame plus this) only for big frames.
pub const READ_BUF_LEN_INITIAL: usize = 16 * 1024;
/// Events read ahead (while a write was blocked) and not yet returned by `recv`.
/// Past it, writes stop with [`ClientError::QueueFull`] instead of growing memory.
pub const EVENT_QUEUE_LEN_MAX: usize = 1 << 18;
/// How long one blocked write waits before reading the server's responses.
/// Only paid when the socket is full, so it costs nothing in the common case.
pub const WRITE_STALL_POLL: Duration = Duration::from_millis(2);
/// Largest `max_frame` adopted from a WELCOME; a confused server cannot make
/// the client buffer gigabytes.
pub const ADOPTED_FRAME_LEN_MAX: u32 = 16 << 20;

/// The server's WELCOME.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub version: u8,
    pub server_time_ms: u64,
    pub max_frame: u32,
    pub pending: u64,
}

/// A message delivered to this client. ACK its `seq` once processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub seq: u64,
    pub msg_id: MsgId,
    pub from: String,
    pub sent_ms: u64,
    pub body: Vec<u8>,
}

/// A server frame after the handshake, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Stored {
        msg_id: MsgId,
    },
    Rejected {
        msg_id: MsgId,
        code: u16,
        reason: String,
    },
    Deliver(Delivered),
    Pong {
        nonce: u64,
    },
    /// The server closes the connection after it.
    Error {
        code: u16,
        reason: String,
    },
}

#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame from the server: {0}")]
    Decode(#[from] DecodeError),
    /// The server closed the connection (FIN, or RST after it closed).
    #[error("connection closed by the server")]
    Closed,
    #[error("server refused the connection: ERROR {code}: {reason}")]
    Refused { code: u16, reason: String },
    #[error("unexpected: {0}")]
    Unexpected(String),
    /// [`EVENT_QUEUE_LEN_MAX`] events are waiting: call `recv` to drain them.
    #[error("{queued} events read ahead and not yet received (EVENT_QUEUE_LEN_MAX); call recv()")]
    QueueFull { queued: usize },
    /// An argument that cannot be put on the wire (e.g. a recipient over 255 bytes).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The TLS handshake failed (untrusted certificate, wrong name, no TLS there).
    #[error("TLS: {0}")]
    Tls(String),
}

/// What the reader produces; WELCOME is only expected by `hello`.
enum Inbound {
    Welcome(Welcome),
    Event(Event),
}

/// A client's transport: plain TCP, or TLS over it (rustls). Also used by
/// the load drivers (bench), which poll the TCP socket themselves.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }

    /// TLS records encrypted but not yet taken by the socket.
    pub fn tls_wants_write(&self) -> bool {
        matches!(self, Stream::Tls(s) if s.conn.wants_write())
    }

    /// Writes pending TLS records; Ok(false) when the (nonblocking) socket is full.
    pub fn flush_tls(&mut self) -> io::Result<bool> {
        if let Stream::Tls(s) = self {
            while s.conn.wants_write() {
                match s.conn.write_tls(&mut s.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(true)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed): the
/// name a server's certificate is checked against by default.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(addr)
}

/// The TLS handshake over a connected (blocking) socket, within `timeout`
/// per read or write; the socket's timeouts stay set to it.
pub fn tls_connect(
    tcp: TcpStream,
    tls: &TlsSettings,
    timeout: Duration,
) -> Result<Stream, ClientError> {
    let conn = rustls::ClientConnection::new(tls.config.clone(), tls.server_name.clone())
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.sock.set_read_timeout(Some(timeout))?;
    s.sock.set_write_timeout(Some(timeout))?;
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    Ok(Stream::Tls(Box::new(s)))
}

/// How to reach a server over TLS: the CA that signed its certificate and
/// the name to check it against.
#[derive(Clone)]
pub struct TlsSettings {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl TlsSettings {
    /// Trusts the certificates in the PEM file `ca` (a development CA from
    /// `iris certs`, or the organisation's) for the server `name` (a DNS name
    /// or an IP address, as in the certificate).
    pub fn from_ca_file(ca: &std::path::Path, name: &str) -> Result<TlsSettings, ClientError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let bad = |why: String| ClientError::InvalidArgument(why);
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| bad(format!("CA file {}: {e}", ca.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| bad(format!("CA file {}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("CA file {}: {e}", ca.display())))?;
        }
        if roots.is_empty() {
            return Err(bad(format!("CA file {}: no certificate", ca.display())));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| bad(format!("server name {name}: {e}")))?;
        Ok(TlsSettings {
            config: std::sync::Arc::new(config),
            server_name,
        })
    }
}

/// A blocking client connection.
pub struct Client {
    stream: Stream,
    limits: Limits,
    /// Received bytes live in `rbuf[rstart..rend]`.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Bytes to send live in `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    inbound: VecDeque<Inbound>,
    /// The server sent FIN (or reset): nothing more will arrive.
    eof: bool,
    /// How long the handshake, or a flush making no progress, may take.
    stall_timeout: Duration,
}

impl Client {
    /// TCP connect + HELLO + wait for WELCOME (or ERROR -> Refused).
    pub fn connect(
        addr: &str,
        user: &str,
        token: &[u8],
        timeout: Duration,
    ) -> Result<(Client, Welcome), ClientError> {
        let mut client = Client::connect_raw(addr, timeout)?;
        let welcome = client.hello(user, token)?;
        Ok((client, welcome))
    }

    /// TCP connect only, no HELLO (for tests that send bad first frames).
    /// `timeout` bounds the connect, the handshake and any stalled flush.
    pub fn connect_raw(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
        Client::connect_raw_with(addr, None, timeout)
    }

    /// TCP (and TLS, with `tls`) connect + HELLO + wait for WELCOME.
    pub fn connect_with(
        addr: &str,
        tls: Option<&TlsSettings>,
        user: &str,
        token: &[u8],
        timeout: Duration,
    ) -> Result<(Client, Welcome), ClientError> {
        let mut client = Client::connect_raw_with(addr, tls, timeout)?;
        let welcome = client.hello(user, token)?;
        Ok((client, welcome))
    }

    /// TCP connect, then the TLS handshake with `tls`; no HELLO.
    pub fn connect_raw_with(
        addr: &str,
        tls: Option<&TlsSettings>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let tcp = connect_any(addr, timeout)?;
        tcp.set_nodelay(true)?;
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(tls) => tls_connect(tcp, tls, timeout)?,
        };
        stream.tcp().set_write_timeout(Some(WRITE_STALL_POLL))?;
        Ok(Client {
            stream,
            limits: Limits::default(),
            rbuf: vec![0; READ_BUF_LEN_INITIAL],
            rstart: 0,
            rend: 0,
            wbuf: Vec::with_capacity(WRITE_BUF_FLUSH_AT),
            wpos: 0,
            inbound: VecDeque::new(),
            eof: false,
            stall_timeout: timeout,
        })
    }

    /// Sends HELLO and waits for WELCOME. ERROR instead is `Refused`.
    pub fn hello(&mut self, user: &str, token: &[u8]) -> Result<Welcome, ClientError> {
        check_str_field("user", user)?;
        if token.len() > TOKEN_WIRE_LEN_MAX {
            return Err(ClientError::InvalidArgument(format!(
                "token of {} bytes exceeds {TOKEN_WIRE_LEN_MAX}",
                token.len()
            )));
        }
        self.queue(&ClientFrame::Hello {
            version: PROTOCOL_VERSION,
            user,
            token,
        })?;
        self.flush()?;
        match self.next_inbound(self.stall_timeout)? {
            Some(Inbound::Welcome(welcome)) => Ok(welcome),
            Some(Inbound::Event(Event::Error { code, reason })) => {
                Err(ClientError::Refused { code, reason })
            }
            Some(Inbound::Event(event)) => Err(ClientError::Unexpected(format!(
                "{event:?} instead of WELCOME"
            ))),
            None => Err(io::Error::new(ErrorKind::TimedOut, "no WELCOME in time").into()),
        }
    }

    /// Queues a SEND; flushed by `flush`, `recv`, or once the buffer passes
    /// [`WRITE_BUF_FLUSH_AT`]. An error means this SEND was not queued.
    pub fn send(&mut self, msg_id: MsgId, to: &str, body: &[u8]) -> Result<(), ClientError> {
        check_str_field("recipient", to)?;
        if body.len() > u32::MAX as usize - 512 {
            return Err(ClientError::InvalidArgument("body over 4 GiB".into()));
        }
        self.queue(&ClientFrame::Send { msg_id, to, body })
    }

    /// Queues a cumulative ACK of every delivered seq <= `seq`.
    pub fn ack(&mut self, seq: u64) -> Result<(), ClientError> {
        self.queue(&ClientFrame::Ack { seq })
    }

    /// Queues a PING; the answer is `Event::Pong` with the same nonce.
    pub fn ping(&mut self, nonce: u64) -> Result<(), ClientError> {
        self.queue(&ClientFrame::Ping { nonce })
    }

    /// Sends BYE and flushes.
    pub fn bye(&mut self) -> Result<(), ClientError> {
        self.queue(&ClientFrame::Bye)?;
        self.flush()
    }

    /// Queues arbitrary bytes (for bad-input tests).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.make_room()?;
        self.wbuf.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes everything queued. Server frames that arrive meanwhile are kept
    /// for `recv`. Fails with `TimedOut` if neither direction moves for the
    /// connect timeout.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let mut last_progress = Instant::now();
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero).into()),
                Ok(n) => {
                    self.wpos += n;
                    last_progress = Instant::now();
                }
                Err(e) if is_would_block(&e) => {
                    // The server may be blocked writing to us: read so it can go on.
                    if self.read_ahead()? {
                        last_progress = Instant::now();
                    } else if last_progress.elapsed() >= self.stall_timeout {
                        return Err(io::Error::new(ErrorKind::TimedOut, "flush stalled").into());
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        // Records rustls encrypted but the socket did not take yet.
        let deadline = Instant::now() + self.stall_timeout;
        loop {
            match self.stream.flush_tls() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if is_would_block(&e) || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(ErrorKind::TimedOut, "flush stalled").into());
            }
        }
    }

    /// Flushes pending writes, then waits up to `timeout` for the next server
    /// frame. Ok(None) on timeout (a partial frame stays buffered).
    /// Err(Closed) once the server has closed and everything it sent was returned.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        if let Err(e) = self.flush() {
            match e {
                // Hand out what is queued first; the next recv flushes again.
                ClientError::QueueFull { .. } if !self.inbound.is_empty() => {}
                // The server went away; what it said before (an ERROR, say) is still worth reading.
                ClientError::Io(ref io) if is_disconnect(io) => {
                    self.wbuf.clear();
                    self.wpos = 0;
                }
                e => return Err(e),
            }
        }
        match self.next_inbound(timeout)? {
            None => Ok(None),
            Some(Inbound::Event(event)) => Ok(Some(event)),
            Some(Inbound::Welcome(w)) => Err(ClientError::Unexpected(format!(
                "WELCOME outside the handshake: {w:?}"
            ))),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.tcp().local_addr()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.tcp().peer_addr()
    }

    /// The limits server frames are checked against (raised by WELCOME's max_frame).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Overrides the limits server frames are checked against.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    fn queue(&mut self, frame: &ClientFrame<'_>) -> Result<(), ClientError> {
        self.make_room()?;
        encode_client_frame(frame, &mut self.wbuf);
        Ok(())
    }

    /// Flushes before the buffer passes [`WRITE_BUF_FLUSH_AT`], so memory stays bounded.
    fn make_room(&mut self) -> Result<(), ClientError> {
        if self.wbuf.len() - self.wpos >= WRITE_BUF_FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    /// Next inbound frame: queued first, then buffered bytes, then the socket,
    /// waiting up to `timeout`.
    fn next_inbound(&mut self, timeout: Duration) -> Result<Option<Inbound>, ClientError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if self.inbound.is_empty() {
                self.decode_buffered()?;
            }
            if let Some(inbound) = self.inbound.pop_front() {
                return Ok(Some(inbound));
            }
            if self.eof {
                return Err(ClientError::Closed);
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.read_once(remaining) {
                Ok(()) => {}
                Err(e) if is_would_block(&e) => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One read of at most `timeout` (None: forever; zero: don't wait).
    fn read_once(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match timeout {
            Some(t) if t.is_zero() => {
                self.stream.tcp().set_nonblocking(true)?;
                let result = self.read_chunk();
                self.stream.tcp().set_nonblocking(false)?;
                result.map(drop)
            }
            t => {
                self.stream.tcp().set_read_timeout(t)?;
                self.read_chunk().map(drop)
            }
        }
    }

    /// Reads without blocking while a write is stuck. True if anything arrived.
    fn read_ahead(&mut self) -> Result<bool, ClientError> {
        self.stream.tcp().set_nonblocking(true)?;
        let result = self.read_ahead_nonblocking();
        self.stream.tcp().set_nonblocking(false)?;
        result
    }

    fn read_ahead_nonblocking(&mut self) -> Result<bool, ClientError> {
        let mut progress = false;
        while !self.eof {
            self.decode_buffered()?;
            if self.inbound.len() >= EVENT_QUEUE_LEN_MAX {
                return Err(ClientError::QueueFull {
                    queued: self.inbound.len(),
                });
            }
            match self.read_chunk() {
                Ok(n) => progress |= n > 0,
                Err(e) if is_would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.decode_buffered()?;
        Ok(progress)
    }

    /// Reads once into the buffer's free tail; a reset counts as EOF (the
    /// server closed with our bytes unread, e.g. right after an ERROR).
    fn read_chunk(&mut self) -> io::Result<usize> {
        self.make_read_room();
        match self.stream.read(&mut self.rbuf[self.rend..]) {
            Ok(0) => {
                self.eof = true;
                Ok(0)
            }
            Ok(n) => {
                self.rend += n;
                Ok(n)
            }
            Err(e) if is_disconnect(&e) => {
                self.eof = true;
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Ensures free space after `rend`: compact first, grow only when one
    /// partial frame fills the whole buffer (bounded by the frame limit).
    fn make_read_room(&mut self) {
        if self.rend < self.rbuf.len() {
            return;
        }
        if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
            return;
        }
        let frame_max = self.limits.server_frame_len_max() as usize + FRAME_HEADER_LEN;
        let grown = (self.rbuf.len() * 2).min(frame_max.max(READ_BUF_LEN_INITIAL));
        // A whole frame always fits, and whole frames are decoded out before reading.
        assert!(grown > self.rbuf.len(), "read buffer full of whole frames");
        self.rbuf.resize(grown, 0);
    }

    /// Moves every whole frame in the read buffer to the inbound queue (up to its bound).
    fn decode_buffered(&mut self) -> Result<(), ClientError> {
        while self.inbound.len() < EVENT_QUEUE_LEN_MAX {
            let bytes = &self.rbuf[self.rstart..self.rend];
            let Some((frame, consumed)) = decode_server_frame(bytes, &self.limits)? else {
                break;
            };
            let inbound = to_inbound(frame);
            self.rstart += consumed;
            if let Inbound::Welcome(welcome) = &inbound {
                adopt_max_frame(&mut self.limits, welcome.max_frame);
            }
            self.inbound.push_back(inbound);
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        Ok(())
    }
}

/// A server announcing a bigger max_frame will send bigger frames; follow it
/// (capped), keeping the v1 relation body = frame - 64.
fn adopt_max_frame(limits: &mut Limits, max_frame: u32) {
    let max_frame = max_frame.min(ADOPTED_FRAME_LEN_MAX);
    if max_frame > limits.frame_len_max {
        limits.frame_len_max = max_frame;
        limits.body_len_max = limits.body_len_max.max(max_frame - 64);
    }
}

fn to_inbound(frame: ServerFrame<'_>) -> Inbound {
    let event = match frame {
        ServerFrame::Welcome {
            version,
            server_time_ms,
            max_frame,
            pending,
        } => {
            return Inbound::Welcome(Welcome {
                version,
                server_time_ms,
                max_frame,
                pending,
            })
        }
        ServerFrame::Stored { msg_id } => Event::Stored { msg_id },
        ServerFrame::Rejected {
            msg_id,
            code,
            reason,
        } => Event::Rejected {
            msg_id,
            code,
            reason: reason.to_owned(),
        },
        ServerFrame::Deliver {
            seq,
            msg_id,
            from,
            sent_ms,
            body,
        } => Event::Deliver(Delivered {
            seq,
            msg_id,
            from: from.to_owned(),
            sent_ms,
            body: body.to_vec(),
        }),
        ServerFrame::Pong { nonce } => Event::Pong { nonce },
        ServerFrame::Error { code, reason } => Event::Error {
            code,
            reason: reason.to_owned(),
        },
    };
    Inbound::Event(event)
}

fn connect_any(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last_err = io::Error::new(ErrorKind::InvalidInput, format!("{addr}: no address"));
    for sock_addr in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sock_addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

fn check_str_field(what: &str, s: &str) -> Result<(), ClientError> {
    if s.len() > STR_LEN_MAX {
        return Err(ClientError::InvalidArgument(format!(
            "{what} of {} bytes cannot be encoded (str fields hold at most {STR_LEN_MAX})",
            s.len()
        )));
    }
    Ok(())
}

fn is_would_block(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected
    )
}

/// 16 bytes unique within this process (a counter through a bijective mix)
/// and, with overwhelming probability, across processes (a per-process seed
/// from std's randomized hasher keys, the clock and the pid). No rand crate.
pub fn new_msg_id() -> MsgId {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (seed_hi, seed_lo) = *SEED.get_or_init(process_seed);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Odd multiplier and an invertible mixer: distinct n give distinct `hi`.
    let hi = mix64(seed_hi.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let lo = mix64(seed_lo ^ n);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&hi.to_le_bytes());
    id[8..].copy_from_slice(&lo.to_le_bytes());
    id
}

fn process_seed() -> (u64, u64) {
    let random = RandomState::new().build_hasher().finish();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let pid = u64::from(std::process::id());
    (
        mix64(random ^ nanos),
        mix64(random.rotate_left(32) ^ nanos.rotate_left(17) ^ pid),
    )
}

/// The splitmix64 finalizer: a bijection on u64 with good avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
