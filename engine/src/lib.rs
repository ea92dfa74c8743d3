//! Iris engine: cores, shards, inboxes, dedup, routing, and the `iris` binary.
//!
//! Reading order: `runtime` (startup, executors, per-core tasks) → `conn` (one
//! client connection) → `core` (the per-core arena and cross-core mail) →
//! `shard` (inboxes, dedup, WAL) → `record` (WAL payloads).

pub mod abuse;
pub mod admin;
pub mod admin_auth;
pub mod admin_cmd;
pub mod admin_http;
pub mod auth;
pub mod chunked;
pub mod client_cmd;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod core;
pub mod dedup;
pub mod dev_cluster;
pub mod dev_cmd;
pub mod election;
pub mod etcd;
pub mod handover;
pub mod link;
pub mod link_proto;
pub mod lograte;
pub mod memory;
pub mod move_cmd;
pub mod moves;
pub mod mqtt_conn;
pub mod mqtt_session;
pub mod node_tls;
pub mod pilot;
pub mod ports;
pub mod record;
pub mod repl;
pub mod repl_proto;
pub mod rolling;
pub mod route;
pub mod runtime;
pub mod security;
pub mod shard;
#[cfg(test)]
pub mod sim;
pub mod slots;
pub mod sockets;
pub mod stats;
pub mod status_cmd;
pub(crate) mod sys;
pub mod tls;

use clap::{Parser, Subcommand};
use config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "iris",
    version,
    about = "Iris: a durable one-to-one messaging engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node: by default edge and core roles in one process, one shard per core
    /// (`--role core` / `--role edge` with `--cluster`: docs/CLUSTER.md).
    ///
    /// On startup it prints `iris listening on ADDR` on stdout (ADDR is the bound
    /// address, useful with port 0); logs go to stderr (filter with RUST_LOG).
    /// SIGTERM/SIGINT: stop accepting, answer SENDs in flight, ERROR 5 to clients, exit 0.
    Serve(Box<ServeArgs>), // boxed: by far the largest variant
    /// Send TEXT to a user; prints one line per STORED.
    Send(client_cmd::SendArgs),
    /// Receive (and ACK) messages; prints one line per DELIVER.
    Recv(client_cmd::RecvArgs),
    /// Talk to a node's admin HTTP endpoint (promote, handover, stats, health, slot moves).
    Admin(admin_cmd::AdminArgs),
    /// Create a development CA, a server certificate and node certificates (PEM) in DIR.
    Certs(dev_cmd::CertsArgs),
    /// Create an Ed25519 key pair for JWT logins: DIR/KID.key (private) and DIR/KID.pem (public).
    Keygen(dev_cmd::KeygenArgs),
    /// Print a JWT for USER signed with a private key (for `--token`).
    Token(dev_cmd::TokenArgs),
    /// Run a local edge/core cluster as real processes on loopback: writes DIR/cluster.toml,
    /// starts every core node and edge, prints one JSON line when all are ready, and
    /// stops them on SIGTERM/SIGINT (docs/CLUSTER.md).
    DevCluster(dev_cluster::DevClusterArgs),
}

/// Flags override the TOML file, which overrides the defaults.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Log lines on stderr: `text` (for people) or `json` (one JSON object per
    /// line, for log shippers). The level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// What this process is: `all` (one process), `core` (a node of a core pair, with
    /// --cluster and --node) or `edge` (client connections only, with --cluster). [default: all]
    #[arg(long, value_enum)]
    role: Option<config::NodeRole>,
    /// Cluster file (docs/CLUSTER.md): the core pairs, their nodes' addresses, the slot map.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// With --role core: this node's name in the cluster file (its client, link,
    /// replication and admin addresses come from there, not from --listen or --admin).
    #[arg(long)]
    node: Option<String>,
    /// With --role edge: the name in link handshakes and logs. [default: edge-PID]
    #[arg(long)]
    name: Option<String>,
    /// Automatic failover: etcd endpoints (comma-separated http://HOST:PORT, or
    /// all https://HOST:PORT with --etcd-ca; also `etcd` in the cluster file).
    /// Each pair's primary is elected there (docs/CLUSTER.md "Automatic
    /// failover"). Without it, promotion is manual.
    #[arg(long)]
    etcd: Option<String>,
    /// With https --etcd endpoints: the PEM CA that signed etcd's server certificate.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// With --etcd-ca: this node's PEM client certificate, for an etcd that
    /// runs with --client-cert-auth (needs --etcd-key).
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// The PEM private key of --etcd-cert.
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// With --etcd: the leader's lease TTL in ms, whole seconds (a dead primary
    /// is replaced within about this long). [default: 1000]
    #[arg(long)]
    lease_ttl_ms: Option<u64>,
    /// With --etcd: a primary stops acknowledging this long before its lease can
    /// have expired. [default: 200]
    #[arg(long)]
    lease_margin_ms: Option<u64>,
    /// Client listener address (port 0: any free port). [default: 127.0.0.1:7070;
    /// none when only --tls-listen is given]
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// TLS client listener (prints `iris tls listening on ADDR`); needs --tls-cert and --tls-key.
    #[arg(long)]
    tls_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain for --tls-listen (reloaded on SIGHUP and POST /reload).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-listen.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// MQTT 3.1.1 listener (prints `iris mqtt listening on ADDR`): PUBLISH QoS 1 to
    /// inbox/<user>, SUBSCRIBE inbox/<own user>; user name = user id, password = the
    /// JWT with --auth jwt (docs/MQTT.md).
    #[arg(long)]
    mqtt_listen: Option<std::net::SocketAddr>,
    /// MQTT 3.1.1 inside TLS (prints `iris mqtt tls listening on ADDR`), with
    /// --tls-cert and --tls-key.
    #[arg(long)]
    mqtt_tls_listen: Option<std::net::SocketAddr>,
    /// MQTT sessions (user, client id) a process remembers. [default: 100000]
    #[arg(long)]
    mqtt_sessions_max: Option<usize>,
    /// PUBLISH packet ids remembered per MQTT session (a retransmission of an
    /// older one is stored again). [default: 64]
    #[arg(long)]
    mqtt_publish_ids_per_session_max: Option<usize>,
    /// How HELLO is authenticated. `none` only while every client listener is on
    /// loopback (or with --insecure-no-auth). [default: none]
    #[arg(long, value_enum)]
    auth: Option<auth::AuthMode>,
    /// With --auth jwt: a PEM public key, or a directory of them (`*.pem`, the stem is
    /// the `kid`). Reloaded on SIGHUP and POST /reload.
    #[arg(long)]
    jwt_keys: Option<PathBuf>,
    /// Clock skew allowed on a token's `exp` and `nbf`, seconds. [default: 60]
    #[arg(long)]
    jwt_leeway_secs: Option<u64>,
    /// Verified tokens remembered per core. [default: 4096]
    #[arg(long)]
    token_cache_entries: Option<usize>,
    /// Serve a non-loopback client listener with --auth none (anyone logs in as anyone).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Mutual TLS between nodes: the cluster CA (PEM) peers' certificates must chain to.
    #[arg(long)]
    cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the cluster CA.
    #[arg(long)]
    node_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long)]
    node_key: Option<PathBuf>,
    /// Serve a non-loopback replication listener without mutual TLS.
    #[arg(long)]
    insecure_cluster: bool,
    /// Open connections from one address before ERROR 7. [default: 20000]
    #[arg(long)]
    connections_per_address_max: Option<u32>,
    /// New connections from one address per second before ERROR 7. [default: 10000]
    #[arg(long)]
    new_connections_per_address_per_sec: Option<u32>,
    /// Refused logins from one address per minute before its connections get ERROR 7. [default: 600]
    #[arg(long)]
    failed_logins_per_address_per_min: Option<u32>,
    /// SENDs per second one user may sustain on a core before REJECTED 3. [default: 10000]
    #[arg(long)]
    sends_per_user_per_sec: Option<u32>,
    /// SENDs a user may make in a burst above that rate. [default: 20000]
    #[arg(long)]
    send_burst_per_user: Option<u32>,
    /// Data directory (one WAL per shard under it). [default: ./iris-data]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Executors, one pinned thread and one shard per core (0: every allowed CPU).
    /// Fixed when a data directory is created. [default: 0]
    #[arg(long)]
    cores: Option<usize>,
    /// TOML file with any of these settings (top level: listen, data, cores; [limits]: the rest).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Close connections silent this long with ERROR 6. [default: 300000]
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// A connection without a completed HELLO this long after accept gets ERROR 6. [default: 10000]
    #[arg(long)]
    hello_timeout_ms: Option<u64>,
    /// Pending messages per recipient before REJECTED 5. [default: 100000]
    #[arg(long)]
    inbox_len_max: Option<usize>,
    /// Bytes queued to one connection before a slow reader is disconnected. [default: 4194304]
    #[arg(long)]
    outbox_bytes_max: Option<usize>,
    /// Connections per core before ERROR 7. [default: 50000]
    #[arg(long)]
    connections_per_core_max: Option<usize>,
    /// Memory a shard's inboxes may hold (pending messages and the user table,
    /// as allocated) before REJECTED 4. [default: 1073741824]
    #[arg(long)]
    shard_pending_bytes_max: Option<usize>,
    /// Users with inbox state per shard before REJECTED 4. [default: 1000000]
    #[arg(long)]
    inbox_users_max: Option<usize>,
    /// (sender, msg_id) pairs remembered per shard for idempotency. [default: 1000000]
    #[arg(long)]
    dedup_entries_max: Option<usize>,
    /// Largest frame accepted and announced in WELCOME. [default: 65536]
    #[arg(long)]
    frame_len_max: Option<u32>,
    /// Largest SEND body before REJECTED 2. [default: 65472]
    #[arg(long)]
    body_len_max: Option<u32>,
    /// WAL segment size in bytes. [default: 67108864]
    #[arg(long)]
    wal_segment_bytes: Option<u64>,
    /// Admin HTTP address (GET /health, /replication/stats, /metrics; POST /replication/promote).
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    /// Who may use the admin API: `token` (an operator token in
    /// `Authorization: Bearer`) or `none` (loopback only). [default: token]
    #[arg(long, value_enum)]
    admin_auth: Option<config::AdminAuthMode>,
    /// The operator token file (owner-only). [default: DATA/admin.token,
    /// written at the first start; the cluster file's `admin_token_file`]
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Admin routes answered without the token, comma-separated, from
    /// health, metrics, stats, slots; "" for none. [default: health,metrics]
    #[arg(long)]
    admin_public: Option<String>,
    /// Accept replicas on this address (prints `iris replication listening on ADDR`).
    #[arg(long)]
    replication_listen: Option<std::net::SocketAddr>,
    /// Run as a replica of the primary whose replication address this is.
    #[arg(long)]
    replica_of: Option<String>,
    /// What STORED waits for. [default: replica with --replication-listen, else local]
    #[arg(long, value_enum)]
    durability: Option<config::Durability>,
    /// When the replica is gone past the timeout: keep writing on local durability, or refuse. [default: degrade]
    #[arg(long, value_enum)]
    on_replica_loss: Option<config::LossPolicy>,
    /// How long a silent replica (or primary) counts as present. [default: 5000]
    #[arg(long)]
    replica_loss_timeout_ms: Option<u64>,
    /// Replication heartbeat interval. [default: 1000]
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// At start, how long to wait for a listen address held by a listener no live
    /// process owns (a killed iris's io_uring listener lingers a few hundred ms).
    /// A live process on the address is an error at once. [default: 5000]
    #[arg(long)]
    listen_busy_wait_ms: Option<u64>,
}

impl ServeArgs {
    fn into_config(self) -> Result<Config, String> {
        let mut c = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = self.$flag { c.$($field).+ = v; })*
            };
        }
        set!(listen => listen, data => data, cores => cores,
             idle_timeout_ms => limits.idle_timeout_ms, inbox_len_max => limits.inbox_len_max,
             hello_timeout_ms => limits.hello_timeout_ms,
             outbox_bytes_max => limits.outbox_bytes_max,
             connections_per_core_max => limits.connections_per_core_max,
             dedup_entries_max => limits.dedup_entries_max, frame_len_max => limits.frame_len_max,
             shard_pending_bytes_max => limits.shard_pending_bytes_max,
             inbox_users_max => limits.inbox_users_max,
             body_len_max => limits.body_len_max, wal_segment_bytes => limits.wal_segment_bytes,
             listen_busy_wait_ms => limits.listen_busy_wait_ms,
             on_replica_loss => replication.on_replica_loss,
             replica_loss_timeout_ms => replication.loss_timeout_ms, heartbeat_ms => replication.heartbeat_ms);
        set!(mqtt_sessions_max => mqtt.sessions_max,
             mqtt_publish_ids_per_session_max => mqtt.publish_ids_per_session_max);
        if self.mqtt_listen.is_some() {
            c.mqtt_listen = self.mqtt_listen;
        }
        if self.mqtt_tls_listen.is_some() {
            c.mqtt_tls_listen = self.mqtt_tls_listen;
        }
        set!(jwt_leeway_secs => auth.jwt_leeway_secs,
             token_cache_entries => auth.token_cache_entries,
             connections_per_address_max => abuse.connections_per_address_max,
             new_connections_per_address_per_sec => abuse.new_connections_per_address_per_sec,
             failed_logins_per_address_per_min => abuse.failed_logins_per_address_per_min,
             sends_per_user_per_sec => abuse.sends_per_user_per_sec,
             send_burst_per_user => abuse.send_burst_per_user);
        if let Some(role) = self.role {
            c.role = role;
        }
        if self.cluster.is_some() {
            c.cluster = self.cluster.clone();
        }
        if self.node.is_some() {
            c.node = self.node.clone();
        }
        if self.name.is_some() {
            c.name = self.name.clone();
        }
        if self.etcd.is_some() {
            c.election.etcd = self.etcd.clone();
        }
        if self.etcd_ca.is_some() {
            c.election.etcd_ca = self.etcd_ca.clone();
        }
        if self.etcd_cert.is_some() {
            c.election.etcd_cert = self.etcd_cert.clone();
        }
        if self.etcd_key.is_some() {
            c.election.etcd_key = self.etcd_key.clone();
        }
        if let Some(ms) = self.lease_ttl_ms {
            c.election.lease_ttl_ms = ms;
        }
        if let Some(ms) = self.lease_margin_ms {
            c.election.lease_margin_ms = ms;
        }
        if self.tls_listen.is_some() {
            c.tls_listen = self.tls_listen;
            // TLS instead of plain TCP, unless --listen asks for both.
            c.plain = self.listen.is_some();
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.clone();
        }
        if self.tls_key.is_some() {
            c.tls_key = self.tls_key.clone();
        }
        if let Some(mode) = self.auth {
            c.auth.mode = mode;
        }
        if self.jwt_keys.is_some() {
            c.auth.jwt_keys = self.jwt_keys.clone();
        }
        if self.insecure_no_auth {
            c.auth.insecure_no_auth = true;
        }
        if self.cluster_ca.is_some() {
            c.replication.cluster_ca = self.cluster_ca.clone();
        }
        if self.node_cert.is_some() {
            c.replication.node_cert = self.node_cert.clone();
        }
        if self.node_key.is_some() {
            c.replication.node_key = self.node_key.clone();
        }
        if self.insecure_cluster {
            c.replication.insecure_cluster = true;
        }
        if self.admin.is_some() {
            c.admin = self.admin;
        }
        if let Some(mode) = self.admin_auth {
            c.admin_auth = mode;
        }
        if self.admin_token_file.is_some() {
            c.admin_token_file = self.admin_token_file.clone();
        }
        if let Some(public) = &self.admin_public {
            c.admin_public = public
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(String::from)
                .collect();
        }
        if self.replication_listen.is_some() {
            c.replication.listen = self.replication_listen;
        }
        if self.replica_of.is_some() {
            c.replication.replica_of = self.replica_of.clone();
        }
        if self.durability.is_some() {
            c.replication.durability = self.durability;
        }
        if self.frame_len_max.is_some() && self.body_len_max.is_none() {
            c.limits.body_len_max = c.limits.frame_len_max.saturating_sub(64);
        }
        Ok(c)
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal()) // no colour codes in log files
            .with_writer(std::io::stderr)
            .try_init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .try_init(),
    };
    // glommio reports through `log` (e.g. io_uring buffer registration failures): show it.
    let _ = tracing_log::LogTracer::init();
}

/// Entry point of the `iris` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format);
            let result = (*args).into_config().and_then(runtime::serve);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("iris: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Send(args) => client_cmd::run_send(&args),
        Command::Recv(args) => client_cmd::run_recv(&args),
        Command::Admin(args) => admin_cmd::run(&args),
        Command::Certs(args) => dev_cmd::run_certs(&args),
        Command::Keygen(args) => dev_cmd::run_keygen(&args),
        Command::Token(args) => dev_cmd::run_token(&args),
        Command::DevCluster(args) => dev_cluster::run(&args),
    }
}
