//! `iris send` and `iris recv`: small command-line clients over `net::Client`,
//! for trying a server by hand and for scripts.
//!
//! `send` pipelines its messages and prints one `stored <msg id>` line per
//! STORED; `recv` prints each DELIVER and ACKs what it printed, so a message
//! shown by `recv` is consumed (the next `recv` does not show it again).

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use net::{Client, ClientError, Delivered, Event, MsgId};

/// Unanswered SENDs `iris send` keeps in flight. Bounds what the server
/// queues for us (STORED frames) while we are still writing.
const SEND_WINDOW_LEN_MAX: usize = 1024;
/// DELIVERs `iris recv` reads before it ACKs them together.
const RECV_BATCH_LEN_MAX: usize = 256;
/// With no `--timeout`, `iris recv` PINGs after this long without traffic,
/// well inside the server's default idle timeout (300 s).
const RECV_KEEPALIVE: Duration = Duration::from_secs(60);
/// Connect and handshake timeout of `iris recv`.
const RECV_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Exit status for every failure (rejection, server ERROR, connection trouble).
const EXIT_FAILURE: u8 = 1;

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub addr: String,
    /// Sender user id.
    #[arg(long)]
    pub user: String,
    /// Authentication token (with `--auth jwt` servers: a JWT for --user, e.g. from `iris token`).
    #[arg(long, default_value = "")]
    pub token: String,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The server's name to check its certificate against. [default: the host of --addr]
    #[arg(long)]
    pub tls_name: Option<String>,
    /// Recipient user id.
    #[arg(long)]
    pub to: String,
    /// How many copies of TEXT to send (each with a fresh message id).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Seconds to wait for the connection, and for each answer, before failing.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// The message body.
    pub text: String,
}

#[derive(clap::Args, Debug)]
pub struct RecvArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub addr: String,
    /// Recipient user id (whose inbox to read).
    #[arg(long)]
    pub user: String,
    /// Authentication token (with `--auth jwt` servers: a JWT for --user, e.g. from `iris token`).
    #[arg(long, default_value = "")]
    pub token: String,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The server's name to check its certificate against. [default: the host of --addr]
    #[arg(long)]
    pub tls_name: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this many seconds without a message (default: wait forever).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// One JSON object per line: {"seq", "msg_id", "from", "sent_ms", "body"}.
    #[arg(long)]
    pub json: bool,
}

/// Sends TEXT `--count` times; exit 0 only if every message was STORED.
pub fn run_send(args: &SendArgs) -> ExitCode {
    match send(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAILURE),
        Err(err) => {
            eprintln!("iris send: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Prints and ACKs deliveries until `--count` or `--timeout`; exit 0 then.
pub fn run_recv(args: &RecvArgs) -> ExitCode {
    match recv(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("iris recv: {err}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Why a command stopped early.
#[derive(Debug, thiserror::Error)]
enum CmdError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("server error {code}: {reason}")]
    Server { code: u16, reason: String },
    #[error("no answer from the server within {0:?}")]
    NoAnswer(Duration),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// TLS settings from `--tls-ca` (None: plain TCP). The name checked is
/// `--tls-name`, else the host part of `addr`.
fn tls_settings(
    addr: &str,
    ca: Option<&std::path::Path>,
    name: Option<&str>,
) -> Result<Option<net::TlsSettings>, CmdError> {
    let Some(ca) = ca else { return Ok(None) };
    let host = name.unwrap_or_else(|| net::host_of(addr));
    Ok(Some(net::TlsSettings::from_ca_file(ca, host)?))
}

/// Ok(true): all STORED; Ok(false): some REJECTED (reported on stderr).
fn send(args: &SendArgs) -> Result<bool, CmdError> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let (mut client, _welcome) = Client::connect_with(
        &args.addr,
        tls_settings(&args.addr, args.tls_ca.as_deref(), args.tls_name.as_deref())?.as_ref(),
        &args.user,
        args.token.as_bytes(),
        timeout,
    )?;
    let mut stdout = io::stdout().lock();
    let mut in_flight: Vec<MsgId> = Vec::new();
    let (mut sent, mut all_stored) = (0u64, true);
    while sent < args.count || !in_flight.is_empty() {
        while sent < args.count && in_flight.len() < SEND_WINDOW_LEN_MAX {
            let msg_id = net::new_msg_id();
            client.send(msg_id, &args.to, args.text.as_bytes())?;
            in_flight.push(msg_id);
            sent += 1;
        }
        let event = client.recv(timeout)?.ok_or(CmdError::NoAnswer(timeout))?;
        let answered = match &event {
            Event::Stored { msg_id } => *msg_id,
            Event::Rejected { msg_id, .. } => *msg_id,
            Event::Error { code, reason } => {
                return Err(CmdError::Server {
                    code: *code,
                    reason: reason.clone(),
                })
            }
            // Messages for the sender stay in its inbox for a `recv`.
            Event::Deliver(_) | Event::Pong { .. } => continue,
        };
        // An answer to an id we no longer wait for (a duplicate) is ignored.
        let Some(pos) = in_flight.iter().position(|id| *id == answered) else {
            continue;
        };
        in_flight.swap_remove(pos);
        match event {
            Event::Rejected { code, reason, .. } => {
                eprintln!("rejected {} {code} {reason}", hex(&answered));
                all_stored = false;
            }
            _ => writeln!(stdout, "stored {}", hex(&answered))?,
        }
    }
    stdout.flush()?;
    client.bye()?;
    Ok(all_stored)
}

fn recv(args: &RecvArgs) -> Result<(), CmdError> {
    let (mut client, _welcome) = Client::connect_with(
        &args.addr,
        tls_settings(&args.addr, args.tls_ca.as_deref(), args.tls_name.as_deref())?.as_ref(),
        &args.user,
        args.token.as_bytes(),
        RECV_CONNECT_TIMEOUT,
    )?;
    let mut stdout = io::stdout().lock();
    let wait = args.timeout.map_or(RECV_KEEPALIVE, Duration::from_secs);
    let mut received = 0u64;
    let mut keepalive_nonce = 0u64;
    while below(args.count, received) {
        let Some(event) = client.recv(wait)? else {
            if args.timeout.is_some() {
                break;
            }
            keepalive_nonce += 1;
            client.ping(keepalive_nonce)?;
            continue;
        };
        let Some(mut delivered) = delivery(event)? else {
            continue;
        };
        // A batch: this DELIVER and whatever else already arrived, then one ACK.
        let mut batch_len = 0;
        loop {
            print_delivered(&mut stdout, &delivered, args.json)?;
            received += 1;
            batch_len += 1;
            let last_seq = delivered.seq;
            let more = batch_len < RECV_BATCH_LEN_MAX && below(args.count, received);
            let next = if more {
                client.recv(Duration::ZERO)?
            } else {
                None
            };
            match next.map(delivery).transpose()?.flatten() {
                Some(next) => delivered = next,
                None => {
                    stdout.flush()?;
                    client.ack(last_seq)?;
                    break;
                }
            }
        }
    }
    stdout.flush()?;
    close_after_acks(&mut client)
}

/// True while `received` has not reached `--count` (no count: forever).
fn below(count: Option<u64>, received: u64) -> bool {
    count.is_none_or(|count| received < count)
}

/// The DELIVER in `event`; None for events `recv` ignores; ERROR stops.
fn delivery(event: Event) -> Result<Option<Delivered>, CmdError> {
    match event {
        Event::Deliver(delivered) => Ok(Some(delivered)),
        Event::Error { code, reason } => Err(CmdError::Server { code, reason }),
        Event::Stored { .. } | Event::Rejected { .. } | Event::Pong { .. } => Ok(None),
    }
}

/// Waits for a PONG before BYE: the server handles one connection's frames in
/// order, so once it answers the PING it has read every ACK before it, and
/// what this command printed will not be delivered again.
fn close_after_acks(client: &mut Client) -> Result<(), CmdError> {
    const CLOSE_NONCE: u64 = u64::MAX;
    client.ping(CLOSE_NONCE)?;
    loop {
        let event = client
            .recv(RECV_CONNECT_TIMEOUT)?
            .ok_or(CmdError::NoAnswer(RECV_CONNECT_TIMEOUT))?;
        match event {
            Event::Pong { nonce } if nonce == CLOSE_NONCE => break,
            Event::Error { code, reason } => return Err(CmdError::Server { code, reason }),
            // Deliveries past --count stay unACKed: the next `recv` gets them.
            _ => {}
        }
    }
    client.bye()?;
    Ok(())
}

fn print_delivered(out: &mut impl Write, delivered: &Delivered, json: bool) -> io::Result<()> {
    let body = String::from_utf8_lossy(&delivered.body);
    if json {
        let line = serde_json::json!({
            "seq": delivered.seq,
            "msg_id": hex(&delivered.msg_id),
            "from": delivered.from,
            "sent_ms": delivered.sent_ms,
            "body": body,
        });
        writeln!(out, "{line}")
    } else {
        let id = hex(&delivered.msg_id);
        writeln!(out, "{} {} {id} {body}", delivered.seq, delivered.from)
    }
}

/// Lower-case hex of a message id (32 digits).
fn hex(msg_id: &MsgId) -> String {
    msg_id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_32_lower_case_digits() {
        let mut id = [0u8; 16];
        id[0] = 0xab;
        id[15] = 0x01;
        assert_eq!(hex(&id), "ab000000000000000000000000000001");
    }

    #[test]
    fn text_and_json_lines() {
        let delivered = Delivered {
            seq: 7,
            msg_id: [0x11; 16],
            from: "alice".into(),
            sent_ms: 1234,
            body: b"hi \xff there".to_vec(),
        };
        let mut text = Vec::new();
        print_delivered(&mut text, &delivered, false).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            format!("7 alice {} hi \u{fffd} there\n", "11".repeat(16))
        );
        let mut json = Vec::new();
        print_delivered(&mut json, &delivered, true).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["seq"], 7);
        assert_eq!(value["msg_id"], "11".repeat(16));
        assert_eq!(value["from"], "alice");
        assert_eq!(value["sent_ms"], 1234);
        assert_eq!(value["body"], "hi \u{fffd} there");
    }
}
