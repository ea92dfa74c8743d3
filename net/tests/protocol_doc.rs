//! docs/PROTOCOL.md's worked examples are the encoder's bytes: this test
//! parses each `<!-- example: NAME -->` block and compares, so the page
//! cannot drift from the code (and a client author can trust every byte).

use net::codec::{encode_client_frame, encode_server_frame, ClientFrame, MsgId, ServerFrame};
use net::{slot_of, Limits};

const MSG_ID: MsgId = [
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
];

fn protocol_doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    std::fs::read_to_string(path).expect("docs/PROTOCOL.md")
}

/// The bytes of the fenced block after `<!-- example: NAME -->`: on each line,
/// the hex before the `|`.
fn doc_example(doc: &str, name: &str) -> Vec<u8> {
    let marker = format!("<!-- example: {name} -->");
    let after = doc
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker} in docs/PROTOCOL.md"))
        .1;
    let block = after
        .split("```")
        .nth(1)
        .expect("a fenced block after the marker");
    block
        .lines()
        .skip(1) // the info string ("text")
        .filter_map(|line| line.split_once('|').map(|(hex, _)| hex))
        .flat_map(str::split_whitespace)
        .map(|byte| u8::from_str_radix(byte, 16).expect("hex byte"))
        .collect()
}

fn client_bytes(frame: &ClientFrame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_client_frame(frame, &mut out);
    out
}

#[test]
fn hello_example_matches_encoder() {
    let hello = ClientFrame::Hello {
        version: 1,
        user: "alice",
        token: b"s3cr3t",
    };
    assert_eq!(doc_example(&protocol_doc(), "hello"), client_bytes(&hello));
}

#[test]
fn send_example_matches_encoder() {
    let send = ClientFrame::Send {
        msg_id: MSG_ID,
        to: "bob",
        body: b"hello",
    };
    assert_eq!(doc_example(&protocol_doc(), "send"), client_bytes(&send));
}

#[test]
fn deliver_example_matches_encoder() {
    let deliver = ServerFrame::Deliver {
        seq: 1,
        msg_id: MSG_ID,
        from: "alice",
        sent_ms: 1_700_000_000_000,
        body: b"hello",
    };
    let mut bytes = Vec::new();
    encode_server_frame(&deliver, &mut bytes);
    assert_eq!(doc_example(&protocol_doc(), "deliver"), bytes);
}

#[test]
fn limits_and_slots_quoted_in_the_doc_match_the_code() {
    let doc = protocol_doc();
    let limits = Limits::default();
    let frame_row = format!(
        "| `max_frame`: max `len` (type + payload) | {} |",
        limits.frame_len_max
    );
    assert!(doc.contains(&frame_row), "{frame_row}");
    let body_row = format!(
        "| `max_body`: max SEND body | {} (65536 − 64) |",
        limits.body_len_max
    );
    assert!(doc.contains(&body_row), "{body_row}");
    assert!(doc.contains(&format!(
        "| token length | {} bytes |",
        limits.token_len_max
    )));
    assert!(doc.contains(&format!("1 ..= {} bytes of UTF-8", limits.user_id_len_max)));
    assert!(doc.contains(&format!(
        "up to 34 + 64 + 65472 = {} bytes",
        limits.server_frame_len_max()
    )));
    for user in ["alice", "a", ""] {
        let quoted = format!("`slot_of(\"{user}\") = {}`", slot_of(user));
        assert!(doc.contains(&quoted), "{quoted}");
    }
}
