//! `iris admin ...`: talks to a node's admin HTTP server (`--admin ADDR`)
//! through engine::admin_http; `rolling-restart` is engine::rolling,
//! `move-slots` engine::move_cmd, `status` engine::status_cmd.

pub use crate::admin_http::{http, AdminClient};
use crate::rolling::RollingRestartArgs;
use std::path::PathBuf;
use std::process::ExitCode;

/// `iris admin [--admin-token-file FILE] COMMAND`.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The operator token file sent with every request. [default: the
    /// IRIS_ADMIN_TOKEN_FILE environment variable, else the cluster file's
    /// `admin_token_file` (commands with --cluster), else
    /// ./iris-data/admin.token if it exists]
    #[arg(long, global = true)]
    pub admin_token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Promote this replica to primary (epoch + 1). Refused while the
    /// replica still follows a live primary, unless --force
    Promote {
        /// The node's admin address (host:port).
        #[arg(long)]
        admin: String,
        /// Promote even though the primary is alive: two primaries until
        /// the old one sees the new epoch (clients of the old one may hear
        /// STORED for messages the new one never has).
        #[arg(long)]
        force: bool,
    },
    /// Print replication stats JSON
    Stats {
        /// The node's admin address (host:port).
        #[arg(long)]
        admin: String,
    },
    /// Print health
    Health {
        /// The node's admin address (host:port).
        #[arg(long)]
        admin: String,
    },
    /// Restart every core node of a cluster in turn while clients keep
    /// sending: per pair, stop the primary, promote its replica, start the
    /// old primary again as the replica, wait for it to catch up; twice
    RollingRestart(RollingRestartArgs),
    /// Hand a pair's primary role to its replica without losing order: the
    /// primary takes no SENDs (edges hold them) until its replica holds
    /// every record, steps down, and the replica is promoted (with etcd:
    /// elected). Fails, leaving the primary serving, if the replica does
    /// not catch up in time. Prints one JSON line
    Handover(crate::rolling::HandoverArgs),
    /// Move a slot range to another pair under load: the target takes the
    /// range's inboxes, seqs and dedup entries, then serves it; edges follow.
    /// Running it again resumes a move that stopped part way
    MoveSlots(crate::move_cmd::MoveSlotsArgs),
    /// The cluster at a glance (JSON): per pair, who leads, the epoch, each
    /// node's role, mode and replication lag, and the slots; exit 1 unless
    /// every pair has exactly one reachable primary
    Status(crate::status_cmd::StatusArgs),
}

/// Runs one admin command: prints the response body, exit 0 on 2xx; otherwise
/// the body (or the connection error) goes to stderr and the exit code is 1.
pub fn run(args: &AdminArgs) -> ExitCode {
    let flag = args.admin_token_file.as_deref();
    let (method, addr, path) = match &args.command {
        AdminCommand::RollingRestart(a) => return crate::rolling::run(a, flag),
        AdminCommand::Handover(a) => return crate::rolling::run_handover(a, flag),
        AdminCommand::MoveSlots(a) => return crate::move_cmd::run(a, flag),
        AdminCommand::Status(a) => return crate::status_cmd::run(a, flag),
        AdminCommand::Promote {
            admin,
            force: false,
        } => ("POST", admin, "/replication/promote"),
        AdminCommand::Promote { admin, force: true } => {
            ("POST", admin, "/replication/promote?force=1")
        }
        AdminCommand::Stats { admin } => ("GET", admin, "/replication/stats"),
        AdminCommand::Health { admin } => ("GET", admin, "/health"),
    };
    let client = match crate::admin_http::operator_token(flag, None) {
        Ok(token) => AdminClient::new(addr.as_str(), token),
        Err(e) => {
            eprintln!("iris admin: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.call(method, path) {
        Ok((status, body)) if (200..300).contains(&status) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprint!("iris admin: HTTP {status}: {body}");
            if !body.ends_with('\n') {
                eprintln!();
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("iris admin: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Mode, NodeStats, Role};
    use std::sync::Arc;

    fn args(command: AdminCommand) -> AdminArgs {
        AdminArgs {
            admin_token_file: None,
            command,
        }
    }

    fn start_node(role: Role) -> String {
        let stats = Arc::new(NodeStats::new(1, role, Mode::Local, 3));
        let security = std::sync::Arc::new(
            crate::security::Security::open(&crate::config::Config::default()).unwrap(),
        );
        let (addr, _thread) = crate::admin::start(
            "127.0.0.1:0".parse().unwrap(),
            stats,
            security,
            crate::admin::Door::open(),
        )
        .unwrap();
        addr.to_string()
    }

    #[test]
    fn run_exits_0_on_2xx_and_1_otherwise() {
        let addr = start_node(Role::Primary);
        assert_eq!(
            run(&args(AdminCommand::Health {
                admin: addr.clone()
            })),
            ExitCode::SUCCESS
        );
        assert_eq!(
            run(&args(AdminCommand::Stats {
                admin: addr.clone()
            })),
            ExitCode::SUCCESS
        );
        // Already primary: 409.
        assert_eq!(
            run(&args(AdminCommand::Promote {
                admin: addr,
                force: false
            })),
            ExitCode::FAILURE
        );
        // Nobody listening: exit 1, no hang.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(
            run(&args(AdminCommand::Health {
                admin: format!("127.0.0.1:{port}")
            })),
            ExitCode::FAILURE
        );
    }

    #[test]
    fn http_reports_status_and_body() {
        let addr = start_node(Role::Replica);
        let (status, body) = http("GET", &addr, "/health").unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("\"role\":\"replica\""), "{body}");
        assert_eq!(http("GET", &addr, "/missing").unwrap().0, 404);
    }
}
