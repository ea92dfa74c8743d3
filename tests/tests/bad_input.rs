//! Bad input: the offending connection gets the ERROR (or the SEND gets the
//! REJECTED) that docs/PROTOCOL.md names, and a well-behaved pair of clients
//! connected before it keeps working.

use tests::{
    collect_deliveries, connect, connect_raw, error_code, expect_error_then_close, next_event, raw,
    reject_code, round_trip, send_rejected, send_stored, Client, Event, Server,
};

/// carol and dave, connected before any bad client shows up.
struct Bystanders {
    carol: Client,
    dave: Client,
}

impl Bystanders {
    fn connect(server: &Server) -> Bystanders {
        let (carol, _) = connect(server.addr(), "carol");
        let (dave, _) = connect(server.addr(), "dave");
        Bystanders { carol, dave }
    }

    /// A message each way: both connections are alive and served.
    fn still_work(&mut self) {
        round_trip(&mut self.carol, "carol", &mut self.dave, "dave");
        round_trip(&mut self.dave, "dave", &mut self.carol, "carol");
    }
}

fn server() -> Server {
    Server::start(&["--cores", "1"])
}

/// A connection that has said a valid HELLO as `user`.
fn authenticated_raw(server: &Server, user: &str) -> Client {
    let mut client = connect_raw(server.addr());
    let welcome = client.hello(user, b"token").expect("hello");
    assert_eq!(welcome.version, 1);
    client
}

/// Writes `bytes` on `client` and expects ERROR `code`, then the close.
/// (`recv` flushes, and still returns what the server said if it already hung up.)
fn write_expect_error(client: &mut Client, bytes: &[u8], code: u16) {
    client.write_raw(bytes).expect("write_raw");
    expect_error_then_close(client, code);
}

#[test]
fn first_frame_not_hello_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut ping_first = connect_raw(server.addr());
    write_expect_error(
        &mut ping_first,
        &raw::ping(7),
        error_code::PROTOCOL_VIOLATION,
    );
    let mut send_first = connect_raw(server.addr());
    let send = raw::send(&[1; 16], b"dave", b"sneaky");
    write_expect_error(&mut send_first, &send, error_code::PROTOCOL_VIOLATION);

    bystanders.still_work();
    // The unauthenticated SEND must not have reached dave.
    tests::expect_quiet(&mut bystanders.dave);
}

#[test]
fn hello_with_unsupported_version_is_error_4() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut client = connect_raw(server.addr());
    let hello = raw::hello(2, b"mallory", b"token");
    write_expect_error(&mut client, &hello, error_code::UNSUPPORTED_VERSION);

    bystanders.still_work();
}

#[test]
fn zero_length_frame_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut client = authenticated_raw(&server, "mallory");
    write_expect_error(
        &mut client,
        &0u32.to_le_bytes(),
        error_code::PROTOCOL_VIOLATION,
    );

    bystanders.still_work();
}

/// The length is checked from the header alone: the server must not wait
/// for (or buffer) 64 KiB of a frame it will refuse anyway.
#[test]
fn frame_longer_than_max_frame_is_error_3() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut client = authenticated_raw(&server, "mallory");
    let mut bytes = 65537u32.to_le_bytes().to_vec();
    bytes.push(raw::SEND);
    bytes.extend_from_slice(&[0; 16]);
    write_expect_error(&mut client, &bytes, error_code::FRAME_TOO_LARGE);

    let mut huge = authenticated_raw(&server, "mallory2");
    write_expect_error(
        &mut huge,
        &u32::MAX.to_le_bytes(),
        error_code::FRAME_TOO_LARGE,
    );

    bystanders.still_work();
}

#[test]
fn frame_len_max_is_configurable_and_announced() {
    let server = Server::start(&["--cores", "1", "--frame-len-max", "1024"]);
    let mut bystanders = Bystanders::connect(&server);

    let mut client = connect_raw(server.addr());
    let welcome = client.hello("mallory", b"token").expect("hello");
    assert_eq!(welcome.max_frame, 1024);
    // A complete, well-formed SEND whose frame is 1025 bytes long.
    let body = vec![b'x'; 1025 - (1 + 16 + 1 + 4)];
    let send = raw::send(&[9; 16], b"dave", &body);
    assert_eq!(send.len(), 4 + 1025);
    write_expect_error(&mut client, &send, error_code::FRAME_TOO_LARGE);

    bystanders.still_work();
}

#[test]
fn invalid_utf8_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut in_send = authenticated_raw(&server, "mallory");
    let send = raw::send(&[2; 16], &[0xff, 0xfe, b'a'], b"body");
    write_expect_error(&mut in_send, &send, error_code::PROTOCOL_VIOLATION);

    let mut in_hello = connect_raw(server.addr());
    let hello = raw::hello(1, &[b'a', 0xc3, 0x28], b"token");
    write_expect_error(&mut in_hello, &hello, error_code::PROTOCOL_VIOLATION);

    bystanders.still_work();
}

#[test]
fn unknown_frame_type_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut unknown = authenticated_raw(&server, "mallory");
    let frame = raw::frame(0x55, b"xyz");
    write_expect_error(&mut unknown, &frame, error_code::PROTOCOL_VIOLATION);

    // A server-to-client type (STORED) is not a client frame either.
    let mut server_type = authenticated_raw(&server, "mallory2");
    let frame = raw::frame(0x11, &[3; 16]);
    write_expect_error(&mut server_type, &frame, error_code::PROTOCOL_VIOLATION);

    bystanders.still_work();
}

#[test]
fn trailing_bytes_are_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut ping = authenticated_raw(&server, "mallory");
    let frame = raw::frame(raw::PING, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    write_expect_error(&mut ping, &frame, error_code::PROTOCOL_VIOLATION);

    let mut bye = authenticated_raw(&server, "mallory2");
    let frame = raw::frame(0x40, &[0]);
    write_expect_error(&mut bye, &frame, error_code::PROTOCOL_VIOLATION);

    let mut hello = connect_raw(server.addr());
    let mut frame = raw::hello(1, b"mallory3", b"token");
    frame.push(0);
    let len = u32::try_from(frame.len() - 4).expect("small frame");
    frame[..4].copy_from_slice(&len.to_le_bytes());
    write_expect_error(&mut hello, &frame, error_code::PROTOCOL_VIOLATION);

    bystanders.still_work();
}

#[test]
fn ack_beyond_delivered_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let (mut alice, _) = connect(server.addr(), "alice");
    send_stored(&mut alice, "bob", b"one");
    send_stored(&mut alice, "bob", b"two");
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 2);
    collect_deliveries(&mut bob, 2);
    bob.ack(3).expect("ack");
    bob.flush().expect("flush");
    expect_error_then_close(&mut bob, error_code::PROTOCOL_VIOLATION);

    // The bad ACK consumed nothing: both messages come again.
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 2);
    collect_deliveries(&mut bob, 2);

    bystanders.still_work();
}

#[test]
fn bad_hello_user_id_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let too_long = vec![b'a'; 65];
    let bad_users: [&[u8]; 4] = [b"", b"bo\x01b", b"tab\tbed", &too_long];
    for user in bad_users {
        let mut client = connect_raw(server.addr());
        let hello = raw::hello(1, user, b"token");
        write_expect_error(&mut client, &hello, error_code::PROTOCOL_VIOLATION);
    }
    // The longest valid id is accepted.
    let longest = "a".repeat(64);
    let (_client, welcome) = connect(server.addr(), &longest);
    assert_eq!(welcome.version, 1);

    bystanders.still_work();
}

/// User ids the rule of issue 21 (item 2) added to the refusals: C1 control
/// characters (Unicode Cc beyond ASCII) and MQTT's `/`, `+`, `#`. Each was
/// a valid id before (red with `net::check_user_id` planted back to the
/// ASCII-control-only rule: the first HELLO got WELCOME, not ERROR 1).
const NEWLY_BAD_USER_IDS: [&str; 7] = [
    "eve#",
    "bob/alice",
    "+",
    "alice/evil",
    "nel\u{85}",
    "csi\u{9b}2J",
    "\u{80}\u{81}\u{82}\u{83}\u{84}\u{86}\u{87}\u{88}\u{89}\u{8a}",
];

#[test]
fn hello_user_id_with_a_control_char_or_slash_plus_hash_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    for user in NEWLY_BAD_USER_IDS.iter().chain(&["bo\x01b", "\x1b[31mred"]) {
        let mut client = connect_raw(server.addr());
        let hello = raw::hello(1, user.as_bytes(), b"token");
        client.write_raw(&hello).expect("write_raw");
        match next_event(&mut client) {
            Event::Error { code, reason } => {
                assert_eq!(code, error_code::PROTOCOL_VIOLATION, "{user:?}: {reason}");
                assert!(reason.starts_with("bad user id"), "{user:?}: {reason}");
            }
            other => panic!("HELLO as {user:?}: expected ERROR 1, got {other:?}"),
        }
        tests::expect_closed(&mut client);
    }
    // Ids with other punctuation, spaces and non-ASCII letters stay valid.
    for user in ["bob.alice", "eve-1", "żółw 🐢", "a@b:c"] {
        let (_client, welcome) = connect(server.addr(), user);
        assert_eq!(welcome.version, 1, "{user:?}");
    }

    bystanders.still_work();
}

/// Red before the rule (see [`NEWLY_BAD_USER_IDS`]): each of these
/// recipients got STORED.
#[test]
fn send_to_a_recipient_with_a_control_char_or_slash_plus_hash_is_rejected_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let (mut alice, _) = connect(server.addr(), "alice");
    for to in NEWLY_BAD_USER_IDS {
        let code = send_rejected(&mut alice, to, b"to nobody");
        assert_eq!(code, reject_code::BAD_RECIPIENT, "recipient {to:?}");
    }
    round_trip(&mut alice, "alice", &mut bystanders.dave, "dave");

    bystanders.still_work();
}

#[test]
fn second_hello_is_error_1() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let mut client = authenticated_raw(&server, "mallory");
    let hello = raw::hello(1, b"carol", b"token");
    write_expect_error(&mut client, &hello, error_code::PROTOCOL_VIOLATION);

    bystanders.still_work();
}

#[test]
fn send_to_bad_recipient_is_rejected_1_and_connection_stays() {
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let (mut alice, _) = connect(server.addr(), "alice");
    let too_long = "b".repeat(65);
    for to in ["", "b\nob", "\u{7f}del", too_long.as_str()] {
        let code = send_rejected(&mut alice, to, b"to nobody");
        assert_eq!(code, reject_code::BAD_RECIPIENT, "recipient {to:?}");
    }
    // REJECTED is an answer, not an error: the same connection still sends.
    let longest = "b".repeat(64);
    send_stored(&mut alice, &longest, b"to the longest id");
    round_trip(&mut alice, "alice", &mut bystanders.dave, "dave");

    bystanders.still_work();
}

#[test]
fn send_body_over_max_body_is_rejected_2() {
    const BODY_LEN_MAX: usize = 65536 - 64;
    let server = server();
    let mut bystanders = Bystanders::connect(&server);

    let (mut alice, _) = connect(server.addr(), "alice");
    let code = send_rejected(&mut alice, "dave", &vec![b'x'; BODY_LEN_MAX + 1]);
    assert_eq!(code, reject_code::TOO_LARGE);

    // Exactly max_body is fine, and arrives intact.
    let body: Vec<u8> = (0..BODY_LEN_MAX).map(|i| (i % 251) as u8).collect();
    let msg_id = send_stored(&mut alice, "dave", &body);
    match next_event(&mut bystanders.dave) {
        Event::Deliver(d) => {
            assert_eq!(d.msg_id, msg_id);
            assert!(d.body == body, "max-size body corrupted");
            bystanders.dave.ack(d.seq).expect("ack");
        }
        other => panic!("expected the max-size DELIVER, got {other:?}"),
    }

    bystanders.still_work();
}
