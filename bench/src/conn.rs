//! One non-blocking benchmark connection inside a driver thread's event loop:
//! a read buffer frames are decoded from in place, and a write buffer flushed
//! as far as the socket takes it (the poller is asked for writability only
//! while bytes are left over).

use crate::poller::{Interest, Poller};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

/// Bytes a connection reads at most per wake. Larger than the largest server
/// frame (`Limits::server_frame_len_max`, 65570 with the v1 defaults), so a
/// whole frame always fits once the decoded ones before it are compacted away.
pub const READ_BUF_LEN: usize = 128 * 1024;

pub use net::Stream;

pub struct Conn {
    pub stream: Stream,
    pub token: u64,
    rbuf: Box<[u8]>,
    rlen: usize,
    pub wbuf: Vec<u8>,
    wpos: usize,
    writing: bool,
}

impl Conn {
    /// Makes `stream` non-blocking and registers it with `poller` for reading.
    pub fn register(stream: Stream, token: u64, poller: &Poller) -> io::Result<Self> {
        stream.tcp().set_nonblocking(true)?;
        poller.add(stream.tcp().as_raw_fd(), token, Interest::Read)?;
        Ok(Self {
            stream,
            token,
            rbuf: vec![0u8; READ_BUF_LEN].into_boxed_slice(),
            rlen: 0,
            wbuf: Vec::with_capacity(64 * 1024),
            wpos: 0,
            writing: false,
        })
    }

    /// Reads once. `Ok(true)` when bytes arrived, `Ok(false)` on would-block,
    /// `Err` when the peer closed or the socket failed.
    pub fn fill(&mut self) -> Result<bool, String> {
        assert!(
            self.rlen < self.rbuf.len(),
            "read buffer full: a frame is too large"
        );
        let mut got = false;
        loop {
            match self.stream.read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => return Err("server closed the connection".to_string()),
                Ok(n) => {
                    self.rlen += n;
                    // TLS may hold more decrypted bytes than one read took,
                    // which the poller will not announce: read until empty.
                    if matches!(self.stream, Stream::Tls(_)) && self.rlen < self.rbuf.len() {
                        got = true;
                        continue;
                    }
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// The bytes read and not yet consumed.
    pub fn unread(&self) -> &[u8] {
        &self.rbuf[..self.rlen]
    }

    /// Drops the first `used` unread bytes (decoded frames).
    pub fn consume(&mut self, used: usize) {
        assert!(used <= self.rlen);
        self.rbuf.copy_within(used..self.rlen, 0);
        self.rlen -= used;
    }

    /// Writes what the socket takes and adjusts the poller interest.
    pub fn flush(&mut self, poller: &Poller) -> Result<(), String> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err("write returned 0".to_string()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        let tls_done = self.stream.flush_tls().map_err(|e| format!("write: {e}"))?;
        let fd = self.stream.tcp().as_raw_fd();
        if self.wpos == self.wbuf.len() && tls_done {
            self.wbuf.clear();
            self.wpos = 0;
            if self.writing {
                poller
                    .modify(fd, self.token, Interest::Read)
                    .map_err(|e| format!("epoll: {e}"))?;
                self.writing = false;
            }
        } else if !self.writing {
            poller
                .modify(fd, self.token, Interest::ReadWrite)
                .map_err(|e| format!("epoll: {e}"))?;
            self.writing = true;
        }
        Ok(())
    }

    /// Whether written bytes are still waiting for the socket.
    pub fn has_pending_writes(&self) -> bool {
        self.wpos < self.wbuf.len() || self.stream.tls_wants_write()
    }

    pub fn deregister(&self, poller: &Poller) {
        // The socket closes right after; a failure here changes nothing.
        let _ = poller.delete(self.stream.tcp().as_raw_fd());
    }
}
