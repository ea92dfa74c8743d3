//! The `iris send` / `iris recv` client commands against a real server.

use std::collections::HashSet;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use tests::{connect, iris_bin, send_stored, Server};

/// How long one CLI invocation may take before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `iris-e2e <args>` to completion (killed after [`CLI_TIMEOUT`]).
fn iris(args: &[&str]) -> Output {
    let mut child = Command::new(iris_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn iris-e2e");
    let pid = child.id();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let stderr_reader = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = err.read_to_end(&mut text);
        text
    });
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut stdout = Vec::new();
        let _ = out.read_to_end(&mut stdout);
        let status = child.wait();
        let _ = done_tx.send((status, stdout));
    });
    let Ok((status, stdout)) = done_rx.recv_timeout(CLI_TIMEOUT) else {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!(
            "`iris {}` did not finish within {CLI_TIMEOUT:?}",
            args.join(" ")
        );
    };
    Output {
        status: status.expect("wait iris-e2e"),
        stdout,
        stderr: stderr_reader.join().expect("stderr reader"),
    }
}

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8(output.stdout.clone())
        .expect("utf-8 stdout")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn assert_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Parses the `stored <32-hex id>` lines of `iris send`.
fn stored_ids(output: &Output) -> Vec<String> {
    stdout_lines(output)
        .iter()
        .map(|line| {
            let id = line
                .strip_prefix("stored ")
                .unwrap_or_else(|| panic!("unexpected send output line {line:?}"));
            assert_eq!(id.len(), 32, "msg id is 32 hex digits: {line:?}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{line:?}");
            id.to_owned()
        })
        .collect()
}

#[test]
fn cli_send_then_recv_round_trip() {
    let server = Server::start(&["--cores", "1"]);
    let addr = server.addr();

    let sent = iris(&[
        "send",
        "--addr",
        addr,
        "--user",
        "alice",
        "--to",
        "bob",
        "--count",
        "3",
        "hello cli",
    ]);
    assert_exit(&sent, 0, "iris send");
    let ids = stored_ids(&sent);
    assert_eq!(ids.len(), 3);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        3,
        "fresh id per message"
    );

    let received = iris(&[
        "recv", "--addr", addr, "--user", "bob", "--count", "3", "--json",
    ]);
    assert_exit(&received, 0, "iris recv --json");
    let lines = stdout_lines(&received);
    assert_eq!(lines.len(), 3, "one JSON object per message: {lines:?}");
    let mut got_ids = HashSet::new();
    for (line, seq) in lines.iter().zip(1u64..) {
        let json: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        assert_eq!(json["seq"], seq);
        assert_eq!(json["from"], "alice");
        assert_eq!(json["body"], "hello cli");
        assert!(json["sent_ms"].as_u64().is_some_and(|ms| ms > 0), "{line}");
        got_ids.insert(json["msg_id"].as_str().expect("msg_id string").to_owned());
    }
    assert_eq!(got_ids, ids.into_iter().collect::<HashSet<_>>());

    // recv ACKed what it printed: nothing comes back, and --timeout exits 0.
    let again = iris(&["recv", "--addr", addr, "--user", "bob", "--timeout", "2"]);
    assert_exit(&again, 0, "iris recv --timeout");
    assert_eq!(stdout_lines(&again), Vec::<String>::new());

    // Text output: `<seq> <from> <32-hex msg id> <body>`.
    let (mut carol, _) = connect(addr, "carol");
    let msg_id = send_stored(&mut carol, "bob", "héllo text ✓".as_bytes());
    let text = iris(&["recv", "--addr", addr, "--user", "bob", "--count", "1"]);
    assert_exit(&text, 0, "iris recv");
    assert_eq!(
        stdout_lines(&text),
        [format!("4 carol {} héllo text ✓", tests::hex(&msg_id))]
    );
}

#[test]
fn cli_send_fails_on_rejection_and_on_no_server() {
    let server = Server::start(&["--cores", "1"]);

    let rejected = iris(&[
        "send",
        "--addr",
        server.addr(),
        "--user",
        "alice",
        "--to",
        "b\tb",
        "x",
    ]);
    assert_exit(&rejected, 1, "iris send to a bad recipient");
    let stderr = String::from_utf8_lossy(&rejected.stderr);
    assert!(
        stderr
            .lines()
            .any(|line| line.starts_with("rejected ") && line.contains(" 1 ")),
        "stderr should say `rejected <id> 1 <reason>`:\n{stderr}"
    );
    assert!(stored_ids(&rejected).is_empty());

    // A port nothing listens on: take a free one from the kernel and close it.
    let no_server = tests::free_loopback_addr();
    let refused = iris(&[
        "send",
        "--addr",
        &no_server,
        "--user",
        "alice",
        "--to",
        "bob",
        "--timeout-secs",
        "5",
        "x",
    ]);
    assert_exit(&refused, 1, "iris send with no server");
}
