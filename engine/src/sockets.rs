//! A core's client sockets, watched through one io_uring of the core's own:
//! one multishot poll per socket (kernel memory, no task, no buffer), a
//! one-shot write poll only while an outbox waits for room, and an eventfd
//! the kernel signals on every completion, which the core's connection
//! driver (engine::conn) awaits through glommio. Bytes move with plain
//! nonblocking `recv`/`send` on the serving core, into pooled buffers.
//!
//! glommio 0.9 exposes no readiness API of its own; the eventfd is the bridge
//! (read through glommio's ring, so an idle core still sleeps in one
//! io_uring_enter).
#![allow(unsafe_code)]

use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Submission queue entries of a core's socket ring (arming polls, cancels).
/// When full it is submitted and reused, so this bounds no connection count.
pub const SOCKET_RING_ENTRIES: u32 = 256;
/// Completion queue entries: readiness events between two passes of the
/// driver. Past it the kernel keeps completions in its overflow list
/// (IORING_FEAT_NODROP) until the driver reaps them.
pub const SOCKET_RING_COMPLETIONS: u32 = 16_384;

/// What a completion is about (the top bits of its user_data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// The socket's multishot read-readiness poll.
    Read,
    /// A one-shot poll for room in the socket's send buffer.
    Write,
    /// The completion of a poll removal (ignored).
    Cancel,
}

/// A connection's identity in a completion: slot, generation and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub index: u32,
    /// The slot's generation, low 30 bits (a stale completion is told apart).
    pub generation: u32,
    pub watch: Watch,
}

pub const GENERATION_MASK: u32 = (1 << 30) - 1;

impl Token {
    pub fn new(index: u32, generation: u32, watch: Watch) -> Token {
        Token {
            index,
            generation: generation & GENERATION_MASK,
            watch,
        }
    }

    fn encode(self) -> u64 {
        let kind = match self.watch {
            Watch::Read => 1u64,
            Watch::Write => 2,
            Watch::Cancel => 3,
        };
        (kind << 62) | (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    fn decode(data: u64) -> Option<Token> {
        let watch = match data >> 62 {
            1 => Watch::Read,
            2 => Watch::Write,
            3 => Watch::Cancel,
            _ => return None,
        };
        Some(Token {
            index: data as u32,
            generation: (data >> 32) as u32 & GENERATION_MASK,
            watch,
        })
    }
}

/// One completion: whose, its result (poll mask or -errno), and whether the
/// poll stays armed (a multishot poll that ended must be armed again).
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub token: Token,
    pub result: i32,
    pub more: bool,
}

pub struct SocketRing {
    ring: IoUring,
    eventfd: OwnedFd,
    queued: u32,
}

impl SocketRing {
    pub fn new() -> io::Result<SocketRing> {
        let ring = IoUring::builder()
            .setup_cqsize(SOCKET_RING_COMPLETIONS)
            .build(SOCKET_RING_ENTRIES)?;
        let eventfd = blocking_eventfd()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(SocketRing {
            ring,
            eventfd,
            queued: 0,
        })
    }

    /// A descriptor of the eventfd the kernel signals on each completion.
    pub fn eventfd(&self) -> io::Result<RawFd> {
        crate::sys::dup(self.eventfd.as_raw_fd())
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: poll and poll-remove entries carry no pointers into our
            // memory; the descriptors they name stay open (or are closed
            // only after the removal is queued, which io_uring tolerates: it
            // holds its own reference to the file).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.queued += 1;
                return;
            }
            self.submit();
        }
    }

    /// Arms the multishot read-readiness poll of a socket.
    pub fn watch_read(&mut self, fd: RawFd, token: Token) {
        let mask = (libc::POLLIN | libc::POLLRDHUP) as u32;
        let entry = opcode::PollAdd::new(types::Fd(fd), mask)
            .multi(true)
            .build()
            .user_data(token.encode());
        self.push(entry);
    }

    /// Arms a one-shot poll for room to write.
    pub fn watch_write(&mut self, fd: RawFd, token: Token) {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(token.encode());
        self.push(entry);
    }

    /// Removes a poll armed with `token`.
    pub fn unwatch(&mut self, token: Token) {
        let cancel = Token {
            watch: Watch::Cancel,
            ..token
        };
        let entry = opcode::PollRemove::new(token.encode())
            .build()
            .user_data(cancel.encode());
        self.push(entry);
    }

    /// Hands queued entries to the kernel (one io_uring_enter), if any, and
    /// flushes completions the kernel kept in its overflow list.
    pub fn submit(&mut self) {
        let overflow = self.ring.submission().cq_overflow();
        if self.queued == 0 && !overflow {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: the driver reaps and resubmits.
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "socket ring submit failed");
                    break;
                }
            }
        }
        self.queued = 0;
    }

    pub fn has_events(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.ring.submission().cq_overflow()
    }

    /// Moves up to `max` completions into `out`.
    pub fn reap(&mut self, out: &mut Vec<Event>, max: usize) {
        if self.ring.submission().cq_overflow() {
            self.submit();
        }
        for cqe in self.ring.completion().take(max) {
            if let Some(token) = Token::decode(cqe.user_data()) {
                out.push(Event {
                    token,
                    result: cqe.result(),
                    more: io_uring::cqueue::more(cqe.flags()),
                });
            }
        }
    }
}

/// An eventfd to be awaited through glommio (a read of it through io_uring).
/// Blocking on purpose: io_uring answers a read on an O_NONBLOCK eventfd
/// with EAGAIN instead of waiting for it.
pub fn blocking_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a nonblocking socket call did.
pub enum Io {
    Done(usize),
    WouldBlock,
    /// EOF on a read, or an error (the connection is gone).
    Closed,
}

pub fn recv(fd: RawFd, buf: &mut [u8]) -> Io {
    loop {
        // SAFETY: the pointer and length describe `buf`, valid and writable for the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            return Io::Done(n as usize);
        }
        if n == 0 {
            return Io::Closed;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Io::WouldBlock,
            _ => return Io::Closed,
        }
    }
}

pub fn send(fd: RawFd, bytes: &[u8]) -> Io {
    loop {
        // SAFETY: the pointer and length describe `bytes`, valid for the call.
        let n = unsafe {
            libc::send(
                fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Io::Done(n as usize);
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Io::WouldBlock,
            _ => return Io::Closed,
        }
    }
}

/// FIN to the peer (after an ERROR); reading stays possible.
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: no memory-safety preconditions; a bad fd gives EBADF.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Closes a connection's descriptor (the slot owned it).
pub fn close(fd: RawFd) {
    // SAFETY: the caller owned `fd` and forgets it after this call.
    unsafe { libc::close(fd) };
}

pub fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: the option value pointer and length describe `one`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for watch in [Watch::Read, Watch::Write, Watch::Cancel] {
            let t = Token::new(u32::MAX, u32::MAX, watch);
            assert_eq!(Token::decode(t.encode()), Some(t));
            let t = Token::new(7, 1 << 30 | 5, watch);
            assert_eq!(t.generation, 5);
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
    }
}
