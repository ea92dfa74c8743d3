//! Configuration of `iris serve`: every bound of the engine, named, with its
//! default, in one place. Values come from the defaults, then an optional TOML
//! file (`--config`), then command-line flags, in that order of precedence.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// io_uring buffer memory per executor. The memlock limit here is 8 MiB and glommio
/// registers this much per executor, so it must stay at or below 1 MiB
/// (notes/runtime-spike.md).
pub const IO_MEMORY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener address; port 0 picks a free port (printed on stdout).
    pub listen: SocketAddr,
    /// Data directory: one WAL directory per shard under it.
    pub data: PathBuf,
    /// Executors (one pinned thread per core); 0 = every core. One shard per core.
    pub cores: usize,
    /// Admin HTTP (health, stats, promote, metrics) on the control thread; port 0 allowed.
    pub admin: Option<SocketAddr>,
    /// Who may use the admin API: `token` (an operator token; the default)
    /// or `none` (anyone who reaches it: loopback only).
    pub admin_auth: AdminAuthMode,
    /// The operator token file. [default: DATA/admin.token, written (0600)
    /// at the first start if missing; a cluster file's `admin_token_file`
    /// for its nodes]
    pub admin_token_file: Option<PathBuf>,
    /// Admin routes answered without the token: any of `health`, `metrics`,
    /// `stats` (/replication/stats), `slots` (the slot table). Every other
    /// route (promote, handover, reload, slot moves, export) always needs it.
    /// [default: health, metrics]
    pub admin_public: Vec<String>,
    /// Serve plain TCP on `listen`. Off when only `--tls-listen` is given on
    /// the command line (TLS instead of plain); `--listen` too keeps both.
    pub plain: bool,
    /// TLS client listener (same protocol inside TLS); needs tls_cert and tls_key.
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener (reloaded on SIGHUP and POST /reload).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener.
    pub tls_key: Option<PathBuf>,
    /// MQTT 3.1.1 listener (docs/MQTT.md); port 0 picks a free port.
    pub mqtt_listen: Option<SocketAddr>,
    /// MQTT 3.1.1 inside TLS, with the client listener's tls_cert and tls_key.
    pub mqtt_tls_listen: Option<SocketAddr>,
    /// The MQTT listener's own bounds (`[mqtt]`).
    pub mqtt: crate::mqtt_session::MqttLimits,
    pub limits: Limits,
    pub replication: ReplicationConfig,
    pub auth: AuthConfig,
    pub abuse: crate::abuse::AbuseLimits,
    /// What this process is: `all` (edge and core in one), `core` or `edge` (docs/CLUSTER.md).
    pub role: NodeRole,
    /// The cluster file (docs/CLUSTER.md): needed by `core` and `edge`.
    pub cluster: Option<PathBuf>,
    /// With role `core`: this node's name in the cluster file (its addresses come from there).
    pub node: Option<String>,
    /// With role `edge`: its name in link handshakes and logs. [default: edge-PID]
    pub name: Option<String>,
    /// Automatic failover through etcd (docs/CLUSTER.md "Automatic failover").
    pub election: ElectionConfig,
}

/// Who may use the admin API (crate::admin_auth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdminAuthMode {
    /// Routes other than `admin_public` need `Authorization: Bearer <token>`.
    Token,
    /// Anyone who reaches the port is an operator: refused off loopback.
    None,
}

/// Automatic failover: who leads each core pair is decided in etcd
/// (engine::election). Without `etcd`, promotion is manual.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElectionConfig {
    /// etcd endpoints, comma-separated `http://HOST:PORT`, or all
    /// `https://HOST:PORT` with `etcd_ca` (also `etcd` in the cluster file).
    pub etcd: Option<String>,
    /// With https endpoints: the PEM CA that signed etcd's server certificate.
    pub etcd_ca: Option<PathBuf>,
    /// With https endpoints: this node's PEM client certificate for etcd's
    /// `--client-cert-auth` (with `etcd_key`).
    pub etcd_cert: Option<PathBuf>,
    /// The private key of `etcd_cert` (PEM).
    pub etcd_key: Option<PathBuf>,
    /// Key prefix of this cluster in etcd (also `etcd_prefix` in the cluster file).
    pub prefix: Option<String>,
    /// The leader's lease TTL: a dead primary is replaced within about this long.
    pub lease_ttl_ms: u64,
    /// A primary stops acknowledging this long before its lease can have expired.
    pub lease_margin_ms: u64,
    /// How often every node renews its lease.
    pub renew_every_ms: u64,
    /// How often a node reads its pair's leader and state keys.
    pub observe_every_ms: u64,
    /// Deadline of one etcd request.
    pub request_timeout_ms: u64,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        ElectionConfig {
            etcd: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            prefix: None,
            lease_ttl_ms: 1000,
            lease_margin_ms: 200,
            renew_every_ms: 200,
            observe_every_ms: 100,
            request_timeout_ms: 300,
        }
    }
}

impl ElectionConfig {
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.lease_ttl_ms >= 1000 && self.lease_ttl_ms.is_multiple_of(1000),
             "lease_ttl_ms must be a whole number of seconds (etcd's unit), at least 1000"),
            (self.lease_margin_ms > 0 && self.lease_margin_ms < self.lease_ttl_ms / 2,
             "lease_margin_ms must be positive and under half of lease_ttl_ms"),
            (self.renew_every_ms > 0
                && self.renew_every_ms + self.request_timeout_ms
                    < self.lease_ttl_ms - self.lease_margin_ms,
             "renew_every_ms + request_timeout_ms must be under lease_ttl_ms - lease_margin_ms (a renewal must fit before the deadline)"),
            (self.observe_every_ms > 0, "observe_every_ms must be positive"),
            (self.request_timeout_ms > 0, "request_timeout_ms must be positive"),
        ];
        for (ok, why) in checks {
            if !ok {
                return Err(format!("invalid [election] setting: {why}"));
            }
        }
        Ok(())
    }
}

/// What a process does in a cluster (docs/CLUSTER.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// One process: client connections and shards (no cluster file needed).
    #[default]
    All,
    /// A node of a core pair: shards, WAL, replication, a node-link listener;
    /// clients may connect to it directly.
    Core,
    /// Client connections only: every request goes to the owning pair's primary.
    Edge,
}

/// How HELLO is authenticated (engine::auth).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: crate::auth::AuthMode,
    /// A PEM public key, or a directory of them (`*.pem`; a file's stem is its `kid`).
    pub jwt_keys: Option<PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub jwt_leeway_secs: u64,
    /// Verified tokens remembered per core (a HELLO with one costs a lookup, not a verification).
    pub token_cache_entries: usize,
    /// Allow `mode = none` on a non-loopback client listener (anyone logs in as anyone).
    pub insecure_no_auth: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: crate::auth::AuthMode::None,
            jwt_keys: None,
            jwt_leeway_secs: 60,
            token_cache_entries: 4096,
            insecure_no_auth: false,
        }
    }
}

/// What STORED waits for when a replica is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The local fsync only (replicas still follow, asynchronously).
    Local,
    /// The local fsync and the replica's ack.
    Replica,
}

/// What a primary in `replica` durability does when its replica is gone past the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossPolicy {
    /// Keep taking writes on local durability, loudly; back to `replica` once one catches up.
    Degrade,
    /// Refuse writes with REJECTED 4 until a replica is back.
    Block,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Where replicas connect to this node (a primary, or a replica that may be promoted).
    pub listen: Option<SocketAddr>,
    /// Start as a replica of the primary whose replication address this is.
    pub replica_of: Option<String>,
    /// A cluster node's peer (replication address): whom it follows after
    /// stepping down (automatic failover). From the cluster file.
    #[serde(skip)]
    pub peer: Option<String>,
    /// Start as a replica and let the election (etcd) decide who leads.
    #[serde(skip)]
    pub elected: bool,
    /// Default: `replica` when a replication listener is configured, else `local`.
    pub durability: Option<Durability>,
    pub on_replica_loss: LossPolicy,
    /// A replica silent this long is lost (and a primary silent this long, for a replica).
    pub loss_timeout_ms: u64,
    pub heartbeat_ms: u64,
    /// Cap of the replica's reconnect backoff (doubling from 100 ms).
    pub reconnect_backoff_max_ms: u64,
    /// A primary restarted after a crash waits this long for its replica to
    /// hand back the records its log may lack before it serves clients (then
    /// serves without them, loudly). Above reconnect_backoff_max_ms, so a
    /// replica backing off still comes in time.
    pub repair_wait_ms: u64,
    /// Mutual TLS between nodes: the cluster CA (PEM) every node certificate
    /// is checked against, and this node's certificate and key.
    pub cluster_ca: Option<PathBuf>,
    pub node_cert: Option<PathBuf>,
    pub node_key: Option<PathBuf>,
    /// Allow a non-loopback replication listener without mutual TLS.
    pub insecure_cluster: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            listen: None,
            replica_of: None,
            peer: None,
            elected: false,
            durability: None,
            on_replica_loss: LossPolicy::Degrade,
            loss_timeout_ms: 5000,
            heartbeat_ms: 1000,
            reconnect_backoff_max_ms: 5000,
            repair_wait_ms: 10_000,
            cluster_ca: None,
            node_cert: None,
            node_key: None,
            insecure_cluster: false,
        }
    }
}

impl ReplicationConfig {
    /// Whether STORED waits for a replica's ack (when one is there).
    pub fn synchronous(&self) -> bool {
        let default = if self.listen.is_some() {
            Durability::Replica
        } else {
            Durability::Local
        };
        self.durability.unwrap_or(default) == Durability::Replica
    }
}

/// Every bound of the engine. Hitting one gives the error PROTOCOL.md names.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame (u32 length field: type + payload); announced in WELCOME. ERROR 3 above it.
    pub frame_len_max: u32,
    /// Largest SEND body; REJECTED 2 above it. Must leave room for SEND's other fields.
    pub body_len_max: u32,
    /// Pending (stored, not yet ACKed) messages per recipient; REJECTED 5 above it.
    pub inbox_len_max: usize,
    /// Users with inbox state per shard; REJECTED 4 when a new recipient would exceed it.
    pub inbox_users_max: usize,
    /// Memory a shard's inboxes may hold, as allocated: pending messages (sender,
    /// body, queue slot) and the user table (keys, queues, hash table, by
    /// capacity). REJECTED 4 when a SEND would pass it. The dedup table is
    /// bounded apart, by dedup_entries_max (up to about 125 bytes an entry).
    /// RssAnon stays within 10 % of these bounds (tests/tests/memory.rs).
    pub shard_pending_bytes_max: usize,
    /// (sender, msg_id) entries remembered per shard for idempotency; oldest evicted first.
    pub dedup_entries_max: usize,
    /// How long a (sender, msg_id) is remembered (protocol: at least 24 h by default).
    pub dedup_window_secs: u64,
    /// Connections per core; the next one gets ERROR 7.
    pub connections_per_core_max: usize,
    /// Bytes queued for one connection's socket; a reader that lets it fill is disconnected.
    pub outbox_bytes_max: usize,
    /// DELIVERs sent to a connection beyond its last ACK before the shard waits for an ACK.
    pub deliver_window: u64,
    /// SENDs of one connection awaiting STORED/REJECTED; past it the server stops reading it.
    pub sends_in_flight_max: u32,
    /// A connection silent this long gets ERROR 6.
    pub idle_timeout_ms: u64,
    /// Messages queued for another core within one event-loop turn before connections pause.
    pub mesh_outgoing_max: usize,
    /// Batches in flight on each core-to-core channel.
    pub mesh_channel_batches: usize,
    /// Read buffers in each core's pool (each frame_len_max + 4 bytes, lent only while a
    /// connection's bytes are being decoded; none is held while it waits on its socket).
    pub read_buffers_per_core: usize,
    /// Bytes of incomplete frames a core keeps for its connections between reads (each
    /// connection's leftover, exactly sized). Past it, a connection keeps its pool buffer.
    pub partial_frame_bytes_per_core_max: usize,
    /// A connection that has not completed its HELLO this long after accept gets ERROR 6.
    pub hello_timeout_ms: u64,
    /// WAL segment size.
    pub wal_segment_bytes: u64,
    /// Graceful shutdown: how long to wait for in-flight SENDs to be answered.
    pub shutdown_drain_ms: u64,
    /// Graceful shutdown of a primary with a connected replica: how long to
    /// wait for the replica to hold every record before stepping down
    /// (engine::handover); past it the node stops anyway, loudly.
    pub shutdown_handover_ms: u64,
    /// At start: how long to wait for a listen address whose only holder is a
    /// listener no live process owns (a killed process's io_uring listener lingers
    /// for a few hundred ms). A live holder is refused at once.
    pub listen_busy_wait_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7070".parse().expect("literal address"),
            data: PathBuf::from("./iris-data"),
            cores: 0,
            admin: None,
            admin_auth: AdminAuthMode::Token,
            admin_token_file: None,
            admin_public: vec!["health".into(), "metrics".into()],
            plain: true,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            mqtt_listen: None,
            mqtt_tls_listen: None,
            mqtt: Default::default(),
            limits: Limits::default(),
            replication: ReplicationConfig::default(),
            auth: AuthConfig::default(),
            abuse: crate::abuse::AbuseLimits::default(),
            role: NodeRole::All,
            cluster: None,
            node: None,
            name: None,
            election: ElectionConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_len_max: 65536,
            body_len_max: 65536 - 64,
            inbox_len_max: 100_000,
            inbox_users_max: 1_000_000,
            shard_pending_bytes_max: 1 << 30,
            dedup_entries_max: 1_000_000,
            dedup_window_secs: 24 * 3600,
            connections_per_core_max: 50_000,
            outbox_bytes_max: 4 << 20,
            deliver_window: 512,
            sends_in_flight_max: 1024,
            idle_timeout_ms: 5 * 60 * 1000,
            mesh_outgoing_max: 65536,
            mesh_channel_batches: 64,
            read_buffers_per_core: 256,
            partial_frame_bytes_per_core_max: 32 << 20,
            hello_timeout_ms: 10_000,
            wal_segment_bytes: 64 << 20,
            shutdown_drain_ms: 3000,
            shutdown_handover_ms: crate::handover::TIMEOUT_MS,
            listen_busy_wait_ms: 5000,
        }
    }
}

/// SEND's fields besides the body with the shortest recipient: type(1) + msg_id(16) + to(1 + 1).
/// (PROTOCOL.md's defaults, 65536 and 65536 - 64, leave a long recipient less room than max_body.)
const SEND_OVERHEAD_MIN: u32 = 1 + 16 + 1 + 1;

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Checks the relations between limits; a bad combination is refused at start.
    pub fn validate(&self) -> Result<(), String> {
        self.election.validate()?;
        let l = &self.limits;
        let checks: [(bool, &str); 9] = [
            (l.frame_len_max >= 128, "frame_len_max must be at least 128"),
            (
                l.body_len_max + SEND_OVERHEAD_MIN <= l.frame_len_max,
                "body_len_max + 19 (SEND's other fields) must fit in frame_len_max",
            ),
            (l.inbox_len_max > 0, "inbox_len_max must be positive"),
            (
                l.dedup_entries_max > 0,
                "dedup_entries_max must be positive",
            ),
            (
                l.connections_per_core_max > 0,
                "connections_per_core_max must be positive",
            ),
            (
                l.outbox_bytes_max >= 2 * l.frame_len_max as usize,
                "outbox_bytes_max must hold at least two frames",
            ),
            (l.deliver_window > 0, "deliver_window must be positive"),
            (
                l.sends_in_flight_max > 0,
                "sends_in_flight_max must be positive",
            ),
            (
                l.wal_segment_bytes >= 2 * l.frame_len_max as u64,
                "wal_segment_bytes too small",
            ),
        ];
        for (ok, why) in checks {
            if !ok {
                return Err(format!("invalid configuration: {why}"));
            }
        }
        let r = &self.replication;
        if r.heartbeat_ms == 0 || r.loss_timeout_ms <= r.heartbeat_ms {
            return Err(
                "invalid configuration: loss_timeout_ms must exceed heartbeat_ms > 0".into(),
            );
        }
        if l.idle_timeout_ms < 100 {
            return Err("invalid configuration: idle_timeout_ms must be at least 100".into());
        }
        self.validate_security()
    }

    /// The client listeners this configuration opens.
    pub fn client_listeners(&self) -> Vec<SocketAddr> {
        let plain = self.plain.then_some(self.listen);
        let mqtt = self.mqtt_listen.into_iter().chain(self.mqtt_tls_listen);
        plain
            .into_iter()
            .chain(self.tls_listen)
            .chain(mqtt)
            .collect()
    }

    fn validate_security(&self) -> Result<(), String> {
        if !self.plain && self.tls_listen.is_none() {
            return Err(
                "invalid configuration: no client listener (plain is off and no tls_listen)".into(),
            );
        }
        if self.tls_listen.is_some() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err("--tls-listen needs --tls-cert FILE and --tls-key FILE (PEM); `iris certs --out DIR` makes a development pair"
                .into());
        }
        if self.mqtt_tls_listen.is_some() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err("--mqtt-tls-listen needs --tls-cert FILE and --tls-key FILE (PEM)".into());
        }
        if self.mqtt_listen.is_some() || self.mqtt_tls_listen.is_some() {
            let m = &self.mqtt;
            if m.sessions_max == 0 || m.publish_ids_per_session_max == 0 || m.client_id_len_max == 0
            {
                return Err("invalid configuration: the [mqtt] limits must be positive".into());
            }
            if self.limits.deliver_window >= crate::mqtt_session::DELIVERIES_IN_FLIGHT_MAX as u64 {
                return Err(
                    "invalid configuration: with an MQTT listener, deliver_window must be \
                            below 65534 (deliveries in flight need distinct packet ids)"
                        .into(),
                );
            }
        }
        if let Some(addr) = self.admin {
            if !addr.ip().is_loopback() && self.admin_auth == AdminAuthMode::None {
                return Err(format!(
                    "refusing an admin listener on {addr} without operator auth: anyone reaching it \
                     could promote, freeze or read every inbox. Fix: admin_auth = \"token\" (the \
                     default), or a loopback address"
                ));
            }
        }
        if let Some(bad) = self
            .admin_public
            .iter()
            .find(|r| !crate::admin_auth::PUBLIC_ROUTES_ALLOWED.contains(&r.as_str()))
        {
            return Err(format!(
                "admin_public: {bad:?} cannot be public (only {:?} may be)",
                crate::admin_auth::PUBLIC_ROUTES_ALLOWED
            ));
        }
        let a = &self.auth;
        if a.mode == crate::auth::AuthMode::Jwt && a.jwt_keys.is_none() {
            return Err("--auth jwt needs --jwt-keys PATH (a PEM public key or a directory of them); `iris keygen --out DIR` makes a development pair"
                .into());
        }
        let r = &self.replication;
        let cluster = [&r.cluster_ca, &r.node_cert, &r.node_key];
        if cluster.iter().any(|p| p.is_some()) && !cluster.iter().all(|p| p.is_some()) {
            return Err(
                "mutual TLS between nodes needs all of --cluster-ca, --node-cert and --node-key"
                    .into(),
            );
        }
        if let Some(addr) = r.listen {
            if !addr.ip().is_loopback() && r.cluster_ca.is_none() && !r.insecure_cluster {
                return Err(format!(
                    "refusing a replication listener on {addr} without mutual TLS: anyone reaching it \
                     could fence this primary or copy every inbox. Fix: --cluster-ca FILE --node-cert FILE \
                     --node-key FILE (`iris certs` makes development ones), or a loopback address, or \
                     --insecure-cluster to accept it"
                ));
            }
        }
        let ab = &self.abuse;
        if ab.connections_per_address_max == 0
            || ab.new_connections_per_address_per_sec == 0
            || ab.sends_per_user_per_sec == 0
            || ab.send_burst_per_user == 0
        {
            return Err(
                "invalid configuration: the per-address and per-user limits must be positive"
                    .into(),
            );
        }
        if a.token_cache_entries == 0 {
            return Err("invalid configuration: token_cache_entries must be positive".into());
        }
        let exposed: Vec<String> = self
            .client_listeners()
            .into_iter()
            .filter(|addr| !addr.ip().is_loopback())
            .map(|addr| addr.to_string())
            .collect();
        if a.mode == crate::auth::AuthMode::None && !exposed.is_empty() && !a.insecure_no_auth {
            return Err(format!(
                "refusing to serve {} without authentication: anyone could log in as anyone. \
                 Fix: --auth jwt --jwt-keys PATH (`iris keygen` and `iris token` make development \
                 keys and tokens), or listen on loopback only, or pass --insecure-no-auth to accept it",
                exposed.join(", ")
            ));
        }
        Ok(())
    }

    pub fn net_limits(&self) -> net::Limits {
        net::Limits {
            frame_len_max: self.limits.frame_len_max,
            body_len_max: self.limits.body_len_max,
            ..net::Limits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults valid");
    }

    /// Issue 21, 1: an admin listener off loopback without operator auth
    /// refuses to start; with the token (the default) it starts.
    #[test]
    fn an_exposed_admin_listener_needs_operator_auth() {
        let mut c: Config =
            toml::from_str("admin = \"10.0.0.1:7200\"\nadmin_auth = \"none\"\n").unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.contains("without operator auth"), "{err}");
        c.admin_auth = AdminAuthMode::Token;
        c.validate().expect("the token guards it");
        c.admin = Some("127.0.0.1:7200".parse().unwrap());
        c.admin_auth = AdminAuthMode::None;
        c.validate().expect("loopback may go without");
        c.admin_public = vec!["slots/export".into()];
        assert!(c.validate().unwrap_err().contains("cannot be public"));
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str("cores = 3\n[limits]\ninbox_len_max = 7\n").unwrap();
        assert_eq!(c.cores, 3);
        assert_eq!(c.limits.inbox_len_max, 7);
        assert_eq!(c.limits.frame_len_max, 65536);
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
    }

    #[test]
    fn the_mqtt_listener_is_configured_like_the_others() {
        let text = "mqtt_listen = \"127.0.0.1:1883\"\n[mqtt]\nsessions_max = 9\n";
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.mqtt_listen, Some("127.0.0.1:1883".parse().unwrap()));
        assert_eq!(c.mqtt.sessions_max, 9);
        assert_eq!(c.mqtt.publish_ids_per_session_max, 64);
        c.validate().expect("valid");
        // Exposed without auth: refused like a client listener.
        let open: Config = toml::from_str("mqtt_listen = \"0.0.0.0:1883\"").unwrap();
        assert!(open
            .validate()
            .unwrap_err()
            .contains("without authentication"));
        // TLS needs the certificate and key.
        let tls: Config = toml::from_str("mqtt_tls_listen = \"127.0.0.1:8883\"").unwrap();
        assert!(tls.validate().unwrap_err().contains("--tls-cert"));
        let zero: Config =
            toml::from_str("mqtt_listen = \"127.0.0.1:1883\"\n[mqtt]\nsessions_max = 0").unwrap();
        assert!(zero.validate().is_err());
    }

    #[test]
    fn etcd_over_https_takes_a_ca_and_a_client_certificate() {
        let text = "[election]\netcd = \"https://10.0.0.9:2379\"\netcd_ca = \"ca.pem\"\n\
                    etcd_cert = \"n.pem\"\netcd_key = \"n.key\"\n";
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.election.etcd_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(c.election.etcd_cert, Some(PathBuf::from("n.pem")));
        assert_eq!(c.election.etcd_key, Some(PathBuf::from("n.key")));
        // A certificate without its CA, or without its key, is refused
        // before any file is read.
        let mut e = c.election.clone();
        e.etcd_ca = None;
        assert!(crate::pilot::client(&e)
            .err()
            .expect("refused")
            .contains("need etcd_ca"));
        let mut e = c.election.clone();
        e.etcd_key = None;
        assert!(crate::pilot::client(&e)
            .err()
            .expect("refused")
            .contains("go together"));
    }

    #[test]
    fn body_must_fit_in_frame() {
        let mut c = Config::default();
        c.limits.body_len_max = c.limits.frame_len_max;
        assert!(c.validate().is_err());
    }
}
