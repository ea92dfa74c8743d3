//! The blocking client against a scripted in-process server built on the codec.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use net::codec::{
    decode_client_frame, encode_server_frame, error_code, reject_code, ClientFrame, ServerFrame,
};
use net::{new_msg_id, Client, ClientError, Delivered, Event, Limits, MsgId};

const TIMEOUT: Duration = Duration::from_secs(10);

/// One scripted server connection: reads client frames with the codec.
struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    /// Calls `f` with the next client frame; None at EOF.
    fn next<R>(&mut self, f: impl FnOnce(ClientFrame<'_>) -> R) -> Option<R> {
        loop {
            let decoded = decode_client_frame(&self.buf, &Limits::default()).unwrap();
            if let Some((frame, consumed)) = decoded {
                let result = f(frame);
                self.buf.drain(..consumed);
                return Some(result);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn write(&mut self, frame: &ServerFrame<'_>) {
        let mut out = Vec::new();
        encode_server_frame(frame, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    fn welcome(&mut self) {
        let version = self.next(|f| match f {
            ClientFrame::Hello { version, .. } => version,
            other => panic!("expected HELLO, got {other:?}"),
        });
        assert_eq!(version, Some(1));
        self.write(&ServerFrame::Welcome {
            version: 1,
            server_time_ms: 123,
            max_frame: 65536,
            pending: 2,
        });
    }
}

/// Starts a one-connection server running `script`; returns its address.
fn serve(script: impl FnOnce(Peer) + Send + 'static) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        script(Peer {
            stream,
            buf: Vec::new(),
        });
    });
    (addr, handle)
}

#[test]
fn connect_says_hello_and_returns_welcome() {
    let (addr, server) = serve(|mut peer| {
        let hello = peer.next(|f| format!("{f:?}")).unwrap();
        assert_eq!(
            hello,
            format!(
                "{:?}",
                ClientFrame::Hello {
                    version: 1,
                    user: "alice",
                    token: b"tok"
                }
            )
        );
        peer.write(&ServerFrame::Welcome {
            version: 1,
            server_time_ms: 123,
            max_frame: 65536,
            pending: 2,
        });
        assert_eq!(peer.next(|f| f == ClientFrame::Bye), Some(true));
    });
    let (mut client, welcome) = Client::connect(&addr, "alice", b"tok", TIMEOUT).unwrap();
    assert_eq!(
        (
            welcome.version,
            welcome.server_time_ms,
            welcome.max_frame,
            welcome.pending
        ),
        (1, 123, 65536, 2)
    );
    assert!(client.local_addr().unwrap().port() > 0);
    client.bye().unwrap();
    server.join().unwrap();
}

#[test]
fn error_instead_of_welcome_is_refused() {
    let (addr, server) = serve(|mut peer| {
        peer.next(|_| ()).unwrap();
        peer.write(&ServerFrame::Error {
            code: error_code::AUTH_FAILED,
            reason: "bad token",
        });
    });
    match Client::connect(&addr, "alice", b"wrong", TIMEOUT) {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!((code, reason.as_str()), (2, "bad token"));
        }
        other => panic!("expected Refused, got {:?}", other.map(|(_, w)| w)),
    }
    server.join().unwrap();
}

#[test]
fn send_ping_ack_reach_the_server_and_answers_come_back() {
    let id = new_msg_id();
    let (addr, server) = serve(move |mut peer| {
        peer.welcome();
        let got = peer.next(|f| format!("{f:?}")).unwrap();
        let want = ClientFrame::Send {
            msg_id: id,
            to: "bob",
            body: b"hello",
        };
        assert_eq!(got, format!("{want:?}"));
        peer.write(&ServerFrame::Stored { msg_id: id });
        assert_eq!(
            peer.next(|f| f == ClientFrame::Ping { nonce: 9 }),
            Some(true)
        );
        peer.write(&ServerFrame::Pong { nonce: 9 });
        peer.write(&ServerFrame::Deliver {
            seq: 1,
            msg_id: id,
            from: "bob",
            sent_ms: 77,
            body: b"yo",
        });
        assert_eq!(peer.next(|f| f == ClientFrame::Ack { seq: 1 }), Some(true));
        peer.write(&ServerFrame::Rejected {
            msg_id: id,
            code: reject_code::RATE_LIMITED,
            reason: "slow down",
        });
    });
    let (mut client, _) = Client::connect(&addr, "alice", b"", TIMEOUT).unwrap();
    client.send(id, "bob", b"hello").unwrap();
    assert_eq!(
        client.recv(TIMEOUT).unwrap(),
        Some(Event::Stored { msg_id: id })
    );
    client.ping(9).unwrap();
    assert_eq!(
        client.recv(TIMEOUT).unwrap(),
        Some(Event::Pong { nonce: 9 })
    );
    let delivered = Delivered {
        seq: 1,
        msg_id: id,
        from: "bob".into(),
        sent_ms: 77,
        body: b"yo".to_vec(),
    };
    assert_eq!(
        client.recv(TIMEOUT).unwrap(),
        Some(Event::Deliver(delivered))
    );
    client.ack(1).unwrap();
    let rejected = Event::Rejected {
        msg_id: id,
        code: 3,
        reason: "slow down".into(),
    };
    assert_eq!(client.recv(TIMEOUT).unwrap(), Some(rejected));
    server.join().unwrap();
}

#[test]
fn recv_keeps_a_partial_frame_across_a_timeout() {
    let (addr, server) = serve(|mut peer| {
        peer.welcome();
        let mut bytes = Vec::new();
        encode_server_frame(&ServerFrame::Pong { nonce: 5 }, &mut bytes);
        peer.stream.write_all(&bytes[..6]).unwrap();
        assert_eq!(
            peer.next(|f| f == ClientFrame::Ping { nonce: 1 }),
            Some(true)
        );
        peer.stream.write_all(&bytes[6..]).unwrap();
        peer.next(|_| ());
    });
    let (mut client, _) = Client::connect(&addr, "alice", b"", TIMEOUT).unwrap();
    assert_eq!(client.recv(Duration::from_millis(100)).unwrap(), None);
    assert_eq!(client.recv(Duration::ZERO).unwrap(), None);
    client.ping(1).unwrap();
    assert_eq!(
        client.recv(TIMEOUT).unwrap(),
        Some(Event::Pong { nonce: 5 })
    );
    client.bye().unwrap();
    server.join().unwrap();
}

#[test]
fn error_then_close_reads_as_error_then_closed() {
    let (addr, server) = serve(|mut peer| {
        peer.next(|_| ()).unwrap();
        peer.write(&ServerFrame::Error {
            code: error_code::PROTOCOL_VIOLATION,
            reason: "HELLO first",
        });
        // Dropping the stream closes it.
    });
    let mut client = Client::connect_raw(&addr, TIMEOUT).unwrap();
    client.ping(1).unwrap(); // not a HELLO
    let error = Event::Error {
        code: 1,
        reason: "HELLO first".into(),
    };
    assert_eq!(client.recv(TIMEOUT).unwrap(), Some(error));
    assert!(matches!(client.recv(TIMEOUT), Err(ClientError::Closed)));
    assert!(matches!(client.recv(TIMEOUT), Err(ClientError::Closed)));
    server.join().unwrap();
}

/// The server echoes every SEND back as a DELIVER, written blocking, so it
/// stops reading whenever we stop reading. Both directions carry more than the
/// kernel buffers hold, so a client that only wrote would deadlock; ours reads
/// ahead while its writes are blocked.
#[test]
fn pipelining_many_sends_before_reading_does_not_deadlock() {
    const SENDS: usize = 20_000;
    const BODY_LEN: usize = 1000;
    let (addr, server) = serve(move |mut peer| {
        peer.welcome();
        for seq in 1..=SENDS as u64 {
            let mut out = Vec::new();
            peer.next(|f| match f {
                ClientFrame::Send { msg_id, to, body } => encode_server_frame(
                    &ServerFrame::Deliver {
                        seq,
                        msg_id,
                        from: to,
                        sent_ms: seq,
                        body,
                    },
                    &mut out,
                ),
                other => panic!("expected SEND, got {other:?}"),
            })
            .unwrap();
            peer.stream.write_all(&out).unwrap();
        }
    });
    let (mut client, _) = Client::connect(&addr, "alice", b"", TIMEOUT).unwrap();
    let started = Instant::now();
    let sent: Vec<MsgId> = (0..SENDS).map(|_| new_msg_id()).collect();
    for (i, id) in sent.iter().enumerate() {
        client.send(*id, "alice", &[i as u8; BODY_LEN]).unwrap();
    }
    client.flush().unwrap();
    for (i, id) in sent.iter().enumerate() {
        match client.recv(TIMEOUT).unwrap() {
            Some(Event::Deliver(d)) => {
                assert_eq!(
                    (d.seq, d.msg_id),
                    (i as u64 + 1, *id),
                    "in order, none lost"
                );
                assert_eq!(d.body, [i as u8; BODY_LEN]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(started.elapsed() < TIMEOUT);
    server.join().unwrap();
}

#[test]
fn oversize_arguments_are_refused_before_the_wire() {
    let (addr, server) = serve(|mut peer| {
        peer.welcome();
        assert_eq!(peer.next(|f| f == ClientFrame::Bye), Some(true));
    });
    let (mut client, _) = Client::connect(&addr, "alice", b"", TIMEOUT).unwrap();
    let long = "x".repeat(256);
    let err = client.send(new_msg_id(), &long, b"").unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    client.bye().unwrap();
    server.join().unwrap();
}

#[test]
fn msg_ids_are_unique_across_threads() {
    let threads: Vec<_> = (0..4)
        .map(|_| thread::spawn(|| (0..50_000).map(|_| new_msg_id()).collect::<Vec<_>>()))
        .collect();
    let mut all = HashSet::new();
    for t in threads {
        for id in t.join().unwrap() {
            assert!(all.insert(id), "duplicate id {id:?}");
        }
    }
    assert_eq!(all.len(), 200_000);
}
