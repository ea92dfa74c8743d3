//! Starting and stopping the node: startup checks, one pinned glommio executor
//! per core, the per-core tasks (acceptor, mesh, committer, maintenance), and
//! the graceful shutdown on SIGTERM/SIGINT.

use crate::clock::mono_ms;
use crate::config::{Config, IO_MEMORY_BYTES};
use crate::core::{Core, Edge, Mail};
use crate::shard::{Shard, ShardError};
use crate::stats::{HandoverPhase, NodeStats, Role};
use crate::{ports, sys};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::time::{Duration, Instant};

/// How often each core's maintenance task runs (clock, shutdown flag).
pub const MAINTENANCE_TICK: Duration = Duration::from_millis(50);
/// How often idle connections and expired dedup entries are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// After ERROR 5 is queued to every connection: how long to let them flush.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);
/// How often the reloader looks for a SIGHUP.
const RELOAD_POLL: Duration = Duration::from_millis(100);

/// Reloads keys and certificates on SIGHUP (engine::security), until shutdown.
fn spawn_reloader(security: Arc<crate::security::Security>) {
    let spawned = std::thread::Builder::new()
        .name("iris-reload".into())
        .spawn(move || {
            while !sys::SHUTDOWN.load(Ordering::SeqCst) {
                if sys::RELOAD.swap(false, Ordering::SeqCst) {
                    let _ = security.reload();
                }
                std::thread::sleep(RELOAD_POLL);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the reload thread: SIGHUP will not reload");
    }
}

/// Retry of an accept the kernel answered EAGAIN instead of waiting (acceptor).
const ACCEPT_AGAIN: Duration = Duration::from_millis(1);
/// A core holding this many more connections than the least loaded one
/// pauses before its next accept, leaving the shared queue to the others
/// (without it, the core that is awake drains a burst on its own: measured
/// 147/53 of 200 connections on 2 cores).
const ACCEPT_LEAD_MAX: u64 = 8;
/// That pause; the core then accepts anyway (a busy peer cannot stall it).
const ACCEPT_DEFER: Duration = Duration::from_millis(1);
/// Exit code when the WAL fails a sync (the node stops; restart recovers).
const EXIT_WAL_FAILED: i32 = 70;

/// Cores that finished draining their in-flight SENDs during shutdown.
static DRAINED: AtomicUsize = AtomicUsize::new(0);

/// Cores that answered their SENDs in flight since SIGTERM (or gave up at
/// `shutdown_drain_ms`).
pub fn cores_drained() -> usize {
    DRAINED.load(Ordering::SeqCst)
}

type Batch = Vec<Mail>;

/// Stops the process when the WAL can no longer promise durability.
pub fn fatal_if_poisoned(e: &ShardError) {
    if let ShardError::Wal {
        source: wal::WalError::SyncFailed(_) | wal::WalError::Poisoned,
        ..
    } = e
    {
        tracing::error!(error = %e, "WAL sync failed: stopping the node (restart recovers from disk)");
        std::process::exit(EXIT_WAL_FAILED);
    }
}

struct CoreSpec {
    cpu: usize,
    nr_cores: usize,
    /// Its listen addresses are the bound ones (port 0 resolved).
    config: Config,
    stats: Arc<NodeStats>,
    /// This core's dups of the process's client listeners (plain, TLS).
    client_fd: Option<OwnedFd>,
    tls_fd: Option<OwnedFd>,
    /// This core's dups of the MQTT listeners (plain, TLS).
    mqtt_fd: Option<OwnedFd>,
    mqtt_tls_fd: Option<OwnedFd>,
    /// The process's MQTT sessions (engine::mqtt_session).
    mqtt_sessions: Arc<crate::mqtt_session::Sessions>,
    security: Arc<crate::security::Security>,
    addresses: Arc<crate::abuse::Addresses>,
    /// Node-wide count of replication connections (the bound).
    repl_links: Arc<std::sync::atomic::AtomicUsize>,
    node_tls: Option<Arc<crate::node_tls::NodeTls>>,
    /// With mutual TLS: authenticated replication links, taken by core 0.
    repl_inbox: Option<Arc<crate::node_tls::Inbox>>,
    /// This core's dup of the replication listener, if there is one.
    replication_fd: Option<OwnedFd>,
    /// This core's dup of the node-link listener (role core, plain links).
    link_fd: Option<OwnedFd>,
    /// With mutual TLS: authenticated edge links, taken by core 0.
    link_inbox: Option<Arc<crate::node_tls::Inbox>>,
    /// The cluster this process belongs to (roles core and edge).
    cluster: Option<Arc<ClusterSetup>>,
}

/// A cluster member's place: the file, and for a core node its pair and name.
pub struct ClusterSetup {
    pub spec: crate::cluster::ClusterSpec,
    /// A core node's own pair (its users are served by the local shards).
    pub own_pair: Option<u16>,
    /// The node or edge name.
    pub name: String,
    pub link: Option<SocketAddr>,
    /// Who serves each slot now (the file's map changed by slot moves),
    /// shared by the process's cores: routing.
    pub slots: Arc<crate::slots::SlotTable>,
    /// A core node's own log's decisions: what its shards serve
    /// (engine::slots::Ownership).
    pub own_slots: Arc<crate::slots::SlotTable>,
    /// An edge with etcd: each pair's leader epoch, from the watch thread.
    pub elected: Option<Arc<[std::sync::atomic::AtomicU64]>>,
}

impl ClusterSetup {
    fn new(
        spec: crate::cluster::ClusterSpec,
        own_pair: Option<u16>,
        name: String,
        link: Option<SocketAddr>,
    ) -> ClusterSetup {
        let table = || {
            Arc::new(crate::slots::SlotTable::new(
                &spec.slot_map,
                spec.pairs.len(),
            ))
        };
        let (slots, own_slots) = (table(), table());
        ClusterSetup {
            spec,
            own_pair,
            name,
            link,
            slots,
            own_slots,
            elected: None,
        }
    }

    /// Loads the cluster file and, for a core node, takes its addresses from
    /// there and asks its peer whether it is running as primary (a node
    /// restarted after a failover rejoins as the replica).
    fn resolve(config: &mut Config) -> Result<Option<ClusterSetup>, String> {
        use crate::config::NodeRole;
        let Some(path) = config.cluster.clone() else {
            return match config.role {
                NodeRole::All => Ok(None),
                role => Err(format!("--role {role:?} needs --cluster FILE").to_lowercase()),
            };
        };
        let spec = crate::cluster::ClusterSpec::load(&path)?;
        if config.admin_token_file.is_none() {
            config.admin_token_file = spec.admin_token_file.clone();
        }
        match config.role {
            NodeRole::All => Err("--cluster needs --role core or --role edge".into()),
            NodeRole::Edge => {
                if config.election.etcd.is_none() {
                    config.election.etcd = spec.etcd.clone();
                }
                if config.election.prefix.is_none() {
                    config.election.prefix = spec.etcd_prefix.clone();
                }
                let name = config
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("edge-{}", std::process::id()));
                let mut setup = ClusterSetup::new(spec, None, name, None);
                if let Some((etcd, prefix)) = crate::pilot::client(&config.election)? {
                    let names: Vec<String> =
                        setup.spec.pairs.iter().map(|p| p.name.clone()).collect();
                    setup.elected = Some(crate::pilot::spawn_edge_watch(etcd, prefix, names)?);
                }
                Ok(Some(setup))
            }
            NodeRole::Core => {
                let name = config
                    .node
                    .clone()
                    .ok_or("--role core needs --node NAME (a node of the cluster file)")?;
                let (pair, index) = spec
                    .node(&name)
                    .ok_or_else(|| format!("node {name:?} is not in {}", path.display()))?;
                let me = spec.pairs[pair].nodes[index].clone();
                config.listen = me.client;
                config.plain = true;
                config.admin = Some(me.admin);
                if config.election.etcd.is_none() {
                    config.election.etcd = spec.etcd.clone();
                }
                if config.election.prefix.is_none() {
                    config.election.prefix = spec.etcd_prefix.clone();
                }
                let elected = config.election.etcd.is_some();
                config.replication.elected = elected;
                let nodes = &spec.pairs[pair].nodes;
                if nodes.len() > 1 && elected {
                    // Both nodes start as replicas; etcd elects the primary.
                    config.replication.listen = Some(me.replication);
                    let peer = nodes[1 - index].replication.to_string();
                    config.replication.peer = Some(peer.clone());
                    config.replication.replica_of = Some(peer);
                } else if nodes.len() > 1 {
                    config.replication.listen = Some(me.replication);
                    let peer = &nodes[1 - index];
                    // Followed after a handover (engine::handover).
                    config.replication.peer = Some(peer.replication.to_string());
                    let r = &config.replication;
                    let tls = match (&r.cluster_ca, &r.node_cert, &r.node_key) {
                        (Some(ca), Some(cert), Some(key)) => {
                            Some(Arc::new(crate::node_tls::NodeTls::load(ca, cert, key)?))
                        }
                        _ => None,
                    };
                    let role = crate::link::probe(peer.link, &spec, &name, tls.as_ref())?;
                    config.replication.replica_of =
                        crate::cluster::replica_of(&spec, pair, index, role);
                    tracing::info!(node = %name, peer = %peer.name, ?role, replica_of = ?config.replication.replica_of, "cluster role");
                }
                Ok(Some(ClusterSetup::new(
                    spec,
                    Some(pair as u16),
                    name,
                    Some(me.link),
                )))
            }
        }
    }

    fn links(&self) -> crate::route::Links {
        let links = crate::route::Links::new(
            self.spec.instance(),
            self.slots.clone(),
            self.own_pair,
            &self.name,
        );
        let links = match &self.elected {
            Some(elected) => links.with_elected(elected.clone()),
            None => links,
        };
        match self.own_pair {
            Some(_) => links.with_own_slots(self.own_slots.clone()),
            None => links,
        }
    }
}

/// The process's listening sockets: one per address, made before the cores
/// start, every core accepting on a dup (engine::ports).
struct Listeners {
    client: Option<std::net::TcpListener>,
    tls: Option<std::net::TcpListener>,
    replication: Option<std::net::TcpListener>,
    link: Option<std::net::TcpListener>,
    mqtt: Option<std::net::TcpListener>,
    mqtt_tls: Option<std::net::TcpListener>,
}

/// The bound addresses of the listeners (port 0 resolved).
struct Bound {
    client: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    replication: Option<SocketAddr>,
    link: Option<SocketAddr>,
    mqtt: Option<SocketAddr>,
    mqtt_tls: Option<SocketAddr>,
}

impl Listeners {
    fn open(config: &Config, link: Option<SocketAddr>) -> Result<Listeners, String> {
        let wait = Duration::from_millis(config.limits.listen_busy_wait_ms);
        let open = |addr: Option<SocketAddr>, what: &'static str| {
            addr.map(|a| ports::listen_exclusive(a, what, wait).map_err(|e| e.to_string()))
                .transpose()
        };
        Ok(Listeners {
            client: open(config.plain.then_some(config.listen), "client listener")?,
            tls: open(config.tls_listen, "TLS client listener")?,
            replication: open(config.replication.listen, "replication listener")?,
            link: open(link, "node-link listener")?,
            mqtt: open(config.mqtt_listen, "MQTT listener")?,
            mqtt_tls: open(config.mqtt_tls_listen, "MQTT TLS listener")?,
        })
    }

    fn addrs(&self) -> Result<Bound, String> {
        let addr = |l: &Option<std::net::TcpListener>| {
            l.as_ref()
                .map(|l| {
                    l.local_addr()
                        .map_err(|e| format!("cannot read a listener's address: {e}"))
                })
                .transpose()
        };
        Ok(Bound {
            client: addr(&self.client)?,
            tls: addr(&self.tls)?,
            replication: addr(&self.replication)?,
            link: addr(&self.link)?,
            mqtt: addr(&self.mqtt)?,
            mqtt_tls: addr(&self.mqtt_tls)?,
        })
    }

    /// A core's own descriptors for the same sockets (client, TLS, replication, link).
    #[allow(clippy::type_complexity)]
    fn dup(
        &self,
    ) -> Result<
        (
            Option<OwnedFd>,
            Option<OwnedFd>,
            Option<OwnedFd>,
            Option<OwnedFd>,
        ),
        String,
    > {
        Ok((
            dup_listener(&self.client)?,
            dup_listener(&self.tls)?,
            dup_listener(&self.replication)?,
            dup_listener(&self.link)?,
        ))
    }

    /// A core's own descriptors for the MQTT listeners (plain, TLS).
    fn dup_mqtt(&self) -> Result<(Option<OwnedFd>, Option<OwnedFd>), String> {
        Ok((dup_listener(&self.mqtt)?, dup_listener(&self.mqtt_tls)?))
    }
}

/// The node's epoch, persisted across restarts (`DATA/epoch`); 1 when new.
fn read_epoch(data: &Path) -> Result<u64, String> {
    let path = data.join("epoch");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{} is malformed", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(1),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the node's epoch durably (temp file, fsync, rename, fsync dir).
pub fn persist_epoch(data: &Path, epoch: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = data.join("epoch.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{epoch}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, data.join("epoch"))?;
    std::fs::File::open(data)?.sync_all()
}

/// A core's own descriptor for a listening socket, if there is one.
fn dup_listener(l: &Option<std::net::TcpListener>) -> Result<Option<OwnedFd>, String> {
    l.as_ref()
        .map(|l| {
            l.try_clone()
                .map(OwnedFd::from)
                .map_err(|e| format!("cannot dup a listening socket: {e}"))
        })
        .transpose()
}

/// Runs `iris serve` until SIGTERM/SIGINT.
pub fn serve(mut config: Config) -> Result<(), String> {
    // The cluster file gives a core node its addresses: checked with the rest.
    let cluster = ClusterSetup::resolve(&mut config)?.map(Arc::new);
    config.validate()?;
    if let Some(link) = cluster.as_ref().and_then(|c| c.link) {
        let r = &config.replication;
        if !link.ip().is_loopback() && r.cluster_ca.is_none() && !r.insecure_cluster {
            return Err(format!(
                "refusing a node-link listener on {link} without mutual TLS: anyone reaching it \
                 could send as any user. Fix: --cluster-ca FILE --node-cert FILE --node-key FILE, \
                 or loopback addresses, or --insecure-cluster to accept it"
            ));
        }
    }
    let edge_only = config.role == crate::config::NodeRole::Edge;
    sys::probe_io_uring()?;
    let cpus =
        core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id).collect::<Vec<_>>());
    let cpus = cpus.filter(|c| !c.is_empty()).unwrap_or_else(|| vec![0]);
    let nr_cores = if config.cores == 0 {
        cpus.len()
    } else {
        config.cores
    };
    check_memlock(nr_cores)?;
    // An edge holds no durable state: no data directory.
    let _lock = if edge_only {
        None
    } else {
        std::fs::create_dir_all(&config.data)
            .map_err(|e| format!("cannot create {}: {e}", config.data.display()))?;
        let lock = sys::lock_dir(&config.data)?;
        check_layout(&config.data, nr_cores)?;
        Some(lock)
    };
    sys::install_signal_handlers().map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let epoch = if edge_only {
        0
    } else {
        read_epoch(&config.data)?
    };
    let role = if edge_only {
        Role::Edge
    } else if config.replication.replica_of.is_some() || config.replication.elected {
        Role::Replica
    } else {
        Role::Primary
    };
    let mode = crate::repl::initial_mode(&config.replication);
    let stats = Arc::new(NodeStats::new(nr_cores, role, mode, epoch));
    if let Some((c, pair)) = cluster.as_ref().and_then(|c| Some((c, c.own_pair?))) {
        let _ = stats.moves.node.set((c.own_slots.clone(), pair));
    }
    // An edge's cores never talk to each other: each has its own links.
    let mesh = (nr_cores > 1 && !edge_only)
        .then(|| MeshBuilder::<Batch, Full>::full(nr_cores, config.limits.mesh_channel_batches));
    let security = Arc::new(crate::security::Security::open(&config)?);
    for warning in security.warnings() {
        tracing::warn!("{warning}");
    }
    let link_addr = cluster.as_ref().and_then(|c| c.link);
    let mut listeners = Listeners::open(&config, link_addr)?;
    let bound = listeners.addrs()?;
    let r = &config.replication;
    let node_tls = match (&r.cluster_ca, &r.node_cert, &r.node_key) {
        (Some(ca), Some(cert), Some(key)) => {
            Some(Arc::new(crate::node_tls::NodeTls::load(ca, cert, key)?))
        }
        _ => None,
    };
    let repl_links = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let addresses = Arc::new(crate::abuse::Addresses::new(config.abuse.clone()));
    let mqtt_sessions = Arc::new(crate::mqtt_session::Sessions::new(config.mqtt.clone()));
    // With mutual TLS the replication listener is the gateway thread's: no
    // core reads a byte from a peer before its certificate checked out.
    let repl_inbox = match (&node_tls, listeners.replication.take()) {
        (Some(tls), Some(listener)) => Some(crate::node_tls::start_gateway(
            listener,
            tls.clone(),
            repl_links.clone(),
            crate::node_tls::REPLICATION_CONNECTIONS_MAX,
            "replication",
        )?),
        (_, listener) => {
            listeners.replication = listener;
            None
        }
    };
    // The same for the node-link listener: edges authenticate first.
    let link_inbox = match (&node_tls, listeners.link.take()) {
        (Some(tls), Some(listener)) => Some(crate::node_tls::start_gateway(
            listener,
            tls.clone(),
            Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            crate::node_tls::EDGE_LINKS_MAX,
            "link",
        )?),
        (_, listener) => {
            listeners.link = listener;
            None
        }
    };
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::new();
    for core in 0..nr_cores {
        let mut core_config = config.clone();
        if let Some(listen) = bound.client {
            core_config.listen = listen;
        }
        core_config.tls_listen = bound.tls;
        core_config.replication.listen = bound.replication;
        let (client_fd, tls_fd, replication_fd, link_fd) = listeners.dup()?;
        let (mqtt_fd, mqtt_tls_fd) = listeners.dup_mqtt()?;
        let spec = CoreSpec {
            cpu: cpus[core % cpus.len()],
            nr_cores,
            config: core_config,
            stats: stats.clone(),
            client_fd,
            tls_fd,
            mqtt_fd,
            mqtt_tls_fd,
            mqtt_sessions: mqtt_sessions.clone(),
            security: security.clone(),
            repl_links: repl_links.clone(),
            addresses: addresses.clone(),
            node_tls: node_tls.clone(),
            repl_inbox: if core == 0 { repl_inbox.clone() } else { None },
            link_inbox: if core == 0 { link_inbox.clone() } else { None },
            replication_fd,
            link_fd,
            cluster: cluster.clone(),
        };
        let (mesh, ready_tx) = (mesh.clone(), ready_tx.clone());
        let builder = LocalExecutorBuilder::new(Placement::Fixed(spec.cpu))
            .name(&format!("iris-core-{core}"))
            .io_memory(IO_MEMORY_BYTES);
        let spawned = if edge_only {
            builder.spawn(move || edge_core_main(spec, core, ready_tx))
        } else {
            builder.spawn(move || core_main(spec, mesh, ready_tx))
        };
        let handle =
            spawned.map_err(|e| format!("cannot start the executor of core {core}: {e}"))?;
        handles.push(handle);
    }
    // The cores hold their dups; the sockets live as long as one of them does.
    drop(listeners);
    drop(ready_tx); // a core that dies before it is ready then ends the wait
    for _ in 0..nr_cores {
        rx_ready(&ready_rx)?;
    }
    let mut control_tasks: Vec<crate::admin::ControlTask> = Vec::new();
    if let (true, Some(c)) = (config.replication.elected, cluster.as_ref()) {
        let pair = c.own_pair.expect("a core node has a pair") as usize;
        let (etcd, prefix) = crate::pilot::client(&config.election)?.expect("elected: etcd is set");
        let keys = crate::pilot::PairKeys::new(&prefix, &c.spec.pairs[pair].name);
        let settings = crate::pilot::settings(&config);
        stats.elected.store(true, Ordering::SeqCst);
        stats.lease_deadline_us.store(0, Ordering::SeqCst);
        stats.alone_allowed.store(false, Ordering::SeqCst);
        let task = crate::pilot::run(etcd, keys, c.name.clone(), settings, stats.clone());
        control_tasks.push(Box::pin(task));
    }
    if !control_tasks.is_empty() && config.admin.is_none() {
        return Err(
            "automatic failover (--etcd) runs on the admin thread: give the node an admin address"
                .into(),
        );
    }
    let admin = match config.admin {
        Some(addr) => Some(
            crate::admin::start_with(
                addr,
                stats.clone(),
                security.clone(),
                admin_door(&config)?,
                control_tasks,
            )
            .map_err(|e| format!("cannot start admin HTTP on {addr}: {e}"))?
            .0,
        ),
        None => None,
    };
    // Every core accepts on the one socket, which no other process can share:
    // from this line on, connections to `listen` reach this process.
    if let Some(listen) = bound.client {
        println!("iris listening on {listen}");
    }
    if let Some(tls) = bound.tls {
        println!("iris tls listening on {tls}");
    }
    if let Some(mqtt) = bound.mqtt {
        println!("iris mqtt listening on {mqtt}");
    }
    if let Some(mqtt) = bound.mqtt_tls {
        println!("iris mqtt tls listening on {mqtt}");
    }
    if let Some(r) = bound.replication {
        println!("iris replication listening on {r}");
    }
    if let Some(l) = bound.link {
        println!("iris link listening on {l}");
    }
    if let Some(a) = admin {
        println!("iris admin listening on {a}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    spawn_reloader(security.clone());
    let listen = bound
        .client
        .or(bound.tls)
        .map(|a| a.to_string())
        .unwrap_or_default();
    if edge_only {
        tracing::info!(%listen, cores = nr_cores, "iris edge serving");
    } else {
        tracing::info!(%listen, cores = nr_cores, data = %config.data.display(), role = role.name(), epoch, "iris serving");
    }
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(format!("executor failed: {e}")),
        }
    }
    if config.replication.elected && sys::SHUTDOWN.load(Ordering::SeqCst) {
        // The election hands the lease back once the cores drained; the
        // process exits when it did, or when etcd did not answer in time.
        let deadline = Instant::now() + crate::pilot::resign_wait(&config.election);
        while !stats.lease_released.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    failure.map_or(Ok(()), Err)
}

/// The admin API's door: the operator token (read, or written at the first
/// start in the data directory) and the routes left open.
fn admin_door(config: &Config) -> Result<crate::admin::Door, String> {
    use crate::admin_auth::{Token, TOKEN_FILE_NAME};
    let token = match (config.admin_auth, &config.admin_token_file) {
        (crate::config::AdminAuthMode::None, _) => {
            tracing::warn!("admin API without operator auth (admin_auth = none): anyone on this machine is an operator");
            None
        }
        (_, Some(path)) => Some(Token::read(path).map_err(|e| e.to_string())?),
        (_, None) => {
            std::fs::create_dir_all(&config.data)
                .map_err(|e| format!("cannot create {}: {e}", config.data.display()))?;
            let path = config.data.join(TOKEN_FILE_NAME);
            let token = Token::read_or_create(&path).map_err(|e| e.to_string())?;
            tracing::info!(path = %path.display(), "admin API: operator token file");
            Some(token)
        }
    };
    Ok(crate::admin::Door {
        token,
        public: config.admin_public.clone(),
        connections_max: crate::admin::CONNECTIONS_MAX,
    })
}

fn rx_ready(rx: &mpsc::Receiver<Result<(), String>>) -> Result<(), String> {
    rx.recv()
        .map_err(|_| "an executor exited during startup".to_string())?
}

fn check_memlock(nr_cores: usize) -> Result<(), String> {
    let need = (nr_cores * IO_MEMORY_BYTES) as u64;
    let have = sys::memlock_limit();
    if have < need {
        return Err(format!(
            "locked-memory limit is {have} bytes but {nr_cores} executors need {need} (1 MiB of io_uring \
             buffers each). Fix: `ulimit -l {}` (or LimitMEMLOCK in systemd), or fewer --cores",
            need / 1024 + 1024
        ));
    }
    Ok(())
}

/// The shard count is fixed when a data directory is created: routing depends on it.
fn check_layout(data: &Path, nr_cores: usize) -> Result<(), String> {
    let path = data.join("layout.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let shards = text
                .lines()
                .find_map(|l| l.strip_prefix("shards = "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| format!("{} is malformed", path.display()))?;
            if shards != nr_cores {
                return Err(format!(
                    "{} holds {shards} shards but --cores is {nr_cores}: start with --cores {shards}, \
                     or use a new --data directory",
                    data.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = format!(
                "# written by iris at creation; do not edit\nslots = 16384\nshards = {nr_cores}\n"
            );
            std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn shard_dir(data: &Path, shard: usize) -> PathBuf {
    data.join(format!("shard-{shard:03}"))
}

async fn core_main(
    mut spec: CoreSpec,
    mesh: Option<MeshBuilder<Batch, Full>>,
    ready: mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let fail = |msg: String| {
        let _ = ready.send(Err(msg.clone()));
        Err(msg)
    };
    let listener = spec.client_fd.take().map(sys::tcp_listener);
    let tls_listener = spec.tls_fd.take().map(sys::tcp_listener);
    let repl_listener = spec.replication_fd.take().map(sys::tcp_listener);
    let (senders, receivers, id) = match mesh {
        Some(mesh) => {
            let (s, mut r) = mesh.join().await.map_err(|e| format!("core mesh: {e}"))?;
            let id = s.peer_id();
            (Some(s), r.streams(), id)
        }
        None => (None, Vec::new(), 0),
    };
    let ownership = spec.cluster.as_ref().and_then(|c| {
        Some(crate::slots::Ownership {
            table: c.own_slots.clone(),
            routing: c.slots.clone(),
            own_pair: c.own_pair?,
        })
    });
    let (mut shard, report) = match Shard::open(
        id,
        &shard_dir(&spec.config.data, id),
        &spec.config.limits,
        ownership,
    ) {
        Ok(x) => x,
        Err(e) => return fail(format!("cannot open shard {id}: {e}")),
    };
    tracing::info!(shard = id, cpu = spec.cpu, users = shard.users(), recovery = %report, "shard open");
    report_dropped(id, &report, &spec.stats);
    shard.set_epoch(spec.stats.epoch.load(Ordering::SeqCst));
    let repl_config = spec.config.replication.clone();
    if repl_config.elected {
        // Past the lease deadline the shard neither acknowledges nor takes SENDs.
        shard.set_lease_deadline(spec.stats.lease_deadline_us.clone());
    }
    if let Some(primary) = &repl_config.replica_of {
        shard.become_replica(format!("read-only replica of {primary}"));
    } else if repl_config.elected {
        shard.become_replica("waiting for the election in etcd".into());
    } else {
        shard.mode = crate::repl::initial_mode(&repl_config);
    }
    let core = Rc::new(RefCell::new(new_core(
        &spec,
        id,
        crate::core::DataShard::new(shard),
    )));
    let ring = match crate::sockets::SocketRing::new() {
        Ok(ring) => ring,
        Err(e) => return fail(format!("cannot create the core's socket ring: {e}")),
    };
    let bell = match ring.eventfd() {
        Ok(fd) => sys::glommio_file(fd),
        Err(e) => return fail(format!("cannot watch the core's socket ring: {e}")),
    };
    glommio::spawn_local(crate::conn::drive(core.clone(), ring, bell)).detach();
    for (_, rx) in receivers {
        glommio::spawn_local(mesh_receiver(core.clone(), rx)).detach();
    }
    if let Some(senders) = senders {
        glommio::spawn_local(mesh_flusher(core.clone(), senders)).detach();
    }
    glommio::spawn_local(committer(core.clone())).detach();
    glommio::spawn_local(maintenance(core.clone(), spec.config.data.clone())).detach();
    if let Some(l) = repl_listener {
        glommio::spawn_local(replication_acceptor(core.clone(), l)).detach();
    }
    if let Some(inbox) = spec.repl_inbox.clone() {
        match sys::dup(std::os::fd::AsRawFd::as_raw_fd(&inbox.eventfd)) {
            Ok(fd) => {
                let bell = sys::glommio_file(fd);
                glommio::spawn_local(replication_inbox(core.clone(), inbox, bell)).detach();
            }
            Err(e) => return fail(format!("cannot watch the replication gateway: {e}")),
        }
    }
    if let Some(cluster) = &spec.cluster {
        spawn_links(&core, cluster);
        let me = crate::link::CoreIdentity {
            topology: cluster.spec.topology_hash,
            node: cluster.name.as_str().into(),
            pair: cluster.own_pair.unwrap_or(0),
            stats: spec.stats.clone(),
            frame_max: spec.config.limits.frame_len_max as usize + 1024,
            own_slots: cluster.own_slots.clone(),
        };
        if let Some(fd) = spec.link_fd.take() {
            let listener = sys::tcp_listener(fd);
            let task = crate::link::acceptor(core.clone(), listener, me.clone());
            glommio::spawn_local(task).detach();
        }
        if let Some(inbox) = spec.link_inbox.clone() {
            match sys::dup(std::os::fd::AsRawFd::as_raw_fd(&inbox.eventfd)) {
                Ok(fd) => {
                    let bell = sys::glommio_file(fd);
                    glommio::spawn_local(link_inbox(core.clone(), inbox, bell, me)).detach();
                }
                Err(e) => return fail(format!("cannot watch the link gateway: {e}")),
            }
        }
    }
    let is_primary = repl_config.replica_of.is_none() && !repl_config.elected;
    if let Some(primary) = repl_config.replica_of.clone() {
        glommio::spawn_local(crate::repl::follow(core.clone(), primary)).detach();
    }
    // Not sealed by a clean stop: the replica may hold acknowledged records
    // this log lacks. Take them back before serving anyone.
    let unsealed = report.dropped_records() > 0 || report.durable_mark < report.last_position;
    if is_primary && unsealed && repl_config.listen.is_some() && repl_config.synchronous() {
        repair(&core, Duration::from_millis(repl_config.repair_wait_ms)).await;
    }
    let _ = ready.send(Ok(()));
    client_acceptors(&core, &mut spec, listener, tls_listener).await;
    hand_over_before_stopping(&core, spec.config.limits.shutdown_handover_ms).await;
    shutdown(core, spec.nr_cores, spec.config.limits.shutdown_drain_ms).await;
    Ok(())
}

/// Accepts on the client listeners this core has (Iris plain and TLS,
/// MQTT plain and TLS) until shutdown.
async fn client_acceptors(
    core: &Rc<RefCell<Core>>,
    spec: &mut CoreSpec,
    listener: Option<TcpListener>,
    tls_listener: Option<TcpListener>,
) {
    let tls = spec.security.tls.clone();
    let mqtt = spec.mqtt_fd.take().map(sys::tcp_listener);
    let mqtt_tls = spec.mqtt_tls_fd.take().map(sys::tcp_listener);
    futures_lite::future::zip(
        futures_lite::future::zip(
            acceptor(core.clone(), listener, None, false),
            acceptor(core.clone(), tls_listener, tls.clone(), false),
        ),
        futures_lite::future::zip(
            acceptor(core.clone(), mqtt, None, true),
            acceptor(core.clone(), mqtt_tls, tls, true),
        ),
    )
    .await;
}

/// A core's state around its shard (an edge core's: `DataShard::none()`).
fn new_core(spec: &CoreSpec, id: usize, shard: crate::core::DataShard) -> Core {
    let mut edge = Edge::new(
        id as u16,
        spec.nr_cores,
        spec.config.limits.clone(),
        spec.config.net_limits(),
    );
    edge.remote = spec.cluster.as_ref().map(|c| c.links());
    edge.mqtt.sessions = spec.mqtt_sessions.clone();
    let mut repl = crate::repl::ReplState::new(
        spec.config.replication.clone(),
        spec.stats.clone(),
        spec.nr_cores as u32,
        spec.config.listen.to_string(),
    );
    repl.links = spec.repl_links.clone();
    repl.node_tls = spec.node_tls.clone();
    Core {
        shard,
        edge,
        repl,
        commit_waker: None,
        shutdown_waker: None,
        auth: crate::auth::Authenticator::new(
            spec.security.mode,
            spec.security.keys.clone(),
            spec.config.auth.jwt_leeway_secs,
            spec.config.auth.token_cache_entries,
            spec.security.stats.clone(),
        ),
        auth_log: Default::default(),
        addresses: spec.addresses.clone(),
        send_buckets: Default::default(),
    }
}

/// One task per node of every other pair: this core's links (engine::link).
fn spawn_links(core: &Rc<RefCell<Core>>, cluster: &ClusterSetup) {
    for (pair, p) in cluster.spec.pairs.iter().enumerate() {
        if Some(pair as u16) == cluster.own_pair {
            continue;
        }
        for node in 0..p.nodes.len() {
            glommio::spawn_local(crate::link::keep_link(core.clone(), pair as u16, node)).detach();
        }
    }
}

/// An edge core: client connections, links to every pair, no shard.
async fn edge_core_main(
    mut spec: CoreSpec,
    id: usize,
    ready: mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let fail = |msg: String| {
        let _ = ready.send(Err(msg.clone()));
        Err(msg)
    };
    let listener = spec.client_fd.take().map(sys::tcp_listener);
    let tls_listener = spec.tls_fd.take().map(sys::tcp_listener);
    let core = Rc::new(RefCell::new(new_core(
        &spec,
        id,
        crate::core::DataShard::none(),
    )));
    let ring = match crate::sockets::SocketRing::new() {
        Ok(ring) => ring,
        Err(e) => return fail(format!("cannot create the core's socket ring: {e}")),
    };
    let bell = match ring.eventfd() {
        Ok(fd) => sys::glommio_file(fd),
        Err(e) => return fail(format!("cannot watch the core's socket ring: {e}")),
    };
    glommio::spawn_local(crate::conn::drive(core.clone(), ring, bell)).detach();
    glommio::spawn_local(edge_maintenance(core.clone())).detach();
    if let Some(cluster) = &spec.cluster {
        spawn_links(&core, cluster);
    }
    let _ = ready.send(Ok(()));
    client_acceptors(&core, &mut spec, listener, tls_listener).await;
    edge_shutdown(core, spec.config.limits.shutdown_drain_ms).await;
    Ok(())
}

/// An edge core's timers: the clock, lingering, idle and stuck connections,
/// rate-limit buckets, and noticing shutdown.
async fn edge_maintenance(core: Rc<RefCell<Core>>) {
    let mut last_sweep = Instant::now();
    loop {
        glommio::timer::sleep(MAINTENANCE_TICK).await;
        let mut c = core.borrow_mut();
        let now = mono_ms();
        c.edge.clock_ms = now;
        c.edge.expire_lingering();
        crate::link::follow_elected(&mut c);
        c.route_edge_mail();
        publish_connections(&c);
        let stats = Arc::clone(&c.repl.stats);
        crate::repl::publish_counts(&mut c, &stats);
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            c.edge.expire_idle();
            let Core {
                addresses,
                send_buckets,
                ..
            } = &mut *c;
            crate::abuse::sweep_buckets(send_buckets, addresses.limits(), now);
            c.edge.expire_stuck_readers();
        }
        if sys::SHUTDOWN.load(Ordering::SeqCst) && !c.edge.shutting_down {
            tracing::info!(
                core = c.edge.id,
                "shutting down: no new connections or frames"
            );
            c.edge.shutting_down = true;
            if let Some(w) = c.shutdown_waker.take() {
                w.wake();
            }
        }
        if c.edge.shutting_down {
            return;
        }
    }
}

/// An edge's graceful stop: SENDs in flight are answered (bounded), then
/// ERROR 5 to every client and a flush.
async fn edge_shutdown(core: Rc<RefCell<Core>>, drain_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(drain_ms);
    let pause = Duration::from_millis(5);
    while Instant::now() < deadline && core.borrow().edge.sends_in_flight_total > 0 {
        glommio::timer::sleep(pause).await;
    }
    core.borrow_mut().edge.shut_all();
    let flush_deadline = Instant::now() + SHUTDOWN_FLUSH;
    while Instant::now() < flush_deadline && core.borrow().edge.connections > 0 {
        glommio::timer::sleep(pause).await;
    }
    tracing::info!(core = core.borrow().edge.id, "edge core stopped");
}

/// Asks for the records past this log's end and waits (bounded) until a
/// replica has handed them back, or said it has none
/// (`repl::fetch_from_replica`, `repl::plan`).
async fn repair(core: &Rc<RefCell<Core>>, wait: Duration) {
    let (shard, from) = {
        let mut c = core.borrow_mut();
        let from = c.shard.wal().last_position() + 1;
        c.repl.repair_from = Some(from);
        (c.shard.id, from)
    };
    tracing::warn!(
        shard,
        from,
        wait_ms = wait.as_millis() as u64,
        "the WAL was not sealed by a clean stop: waiting for the replica to hand back records from here before serving"
    );
    let deadline = Instant::now() + wait;
    while core.borrow().repl.repair_from.is_some() {
        if Instant::now() >= deadline {
            core.borrow_mut().repl.repair_from = None;
            tracing::warn!(
                shard,
                from,
                "no replica came within repair_wait_ms: serving without whatever it held past this log"
            );
            return;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

/// Records a recovery that cut records off past the durable mark: loudly
/// (WARN, stats, metric), since after a crash the last group commit's records
/// sit there and may have been acknowledged (wal/FORMAT.md).
fn report_dropped(shard: usize, report: &wal::RecoveryReport, stats: &NodeStats) {
    let dropped = report.dropped_records();
    if dropped == 0 {
        return;
    }
    let s = &stats.shards[shard];
    s.recovery_dropped_records.store(dropped, Ordering::Relaxed);
    s.recovery_dropped_from
        .store(report.dropped_from, Ordering::Relaxed);
    tracing::warn!(
        shard,
        dropped,
        from = report.dropped_from,
        through = report.dropped_through,
        durable_mark = report.durable_mark,
        tail = ?report.tail,
        "WAL recovery dropped records past the durable mark: the last group commit before a crash \
         may have been acknowledged; a primary with a replica takes them back from it before serving"
    );
}

/// Accepts replica streams until shutdown (a dead listener ends the task).
async fn replication_acceptor(core: Rc<RefCell<Core>>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let links = core.borrow().repl.links.clone();
                match crate::node_tls::LinkCount::try_new(
                    &links,
                    crate::node_tls::REPLICATION_CONNECTIONS_MAX,
                ) {
                    Some(count) => {
                        let task = crate::repl::accept_replica(core.clone(), stream, Some(count));
                        glommio::spawn_local(task).detach();
                    }
                    None => {
                        let max = crate::node_tls::REPLICATION_CONNECTIONS_MAX;
                        tracing::warn!(max, "replication connections at their bound: closed");
                    }
                }
            }
            Err(e) => {
                let e = std::io::Error::from(e);
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    glommio::timer::sleep(ACCEPT_AGAIN).await; // as in acceptor()
                } else {
                    tracing::warn!(error = %e, "replication accept failed");
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if core.borrow().edge.shutting_down {
            return;
        }
    }
}

/// Takes the edge links the TLS gateway authenticated (engine::node_tls).
async fn link_inbox(
    core: Rc<RefCell<Core>>,
    inbox: Arc<crate::node_tls::Inbox>,
    bell: glommio::io::BufferedFile,
    me: crate::link::CoreIdentity,
) {
    loop {
        if bell.read_at(0, 8).await.is_err() {
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
        for fd in inbox.take() {
            use std::os::fd::IntoRawFd;
            let stream = sys::tcp_stream(fd.into_raw_fd());
            glommio::spawn_local(crate::link::serve(core.clone(), stream, me.clone())).detach();
        }
        if core.borrow().edge.shutting_down {
            return;
        }
    }
}

/// Takes the replication links the TLS gateway authenticated (engine::node_tls).
async fn replication_inbox(
    core: Rc<RefCell<Core>>,
    inbox: Arc<crate::node_tls::Inbox>,
    bell: glommio::io::BufferedFile,
) {
    loop {
        if bell.read_at(0, 8).await.is_err() {
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
        for fd in inbox.take() {
            use std::os::fd::IntoRawFd;
            let stream = sys::tcp_stream(fd.into_raw_fd());
            glommio::spawn_local(crate::repl::accept_replica(core.clone(), stream, None)).detach();
        }
        if core.borrow().edge.shutting_down {
            return;
        }
    }
}

/// Accepts client connections until shutdown; a TLS listener's get a TLS
/// state in their slot, an MQTT listener's speak MQTT (engine::mqtt_conn).
async fn acceptor(
    core: Rc<RefCell<Core>>,
    listener: Option<TcpListener>,
    tls: Option<Arc<crate::tls::TlsContext>>,
    mqtt: bool,
) {
    // Iris's ERROR 7 is bytes neither a TLS nor an MQTT peer can read.
    let say_refusal = tls.is_none() && !mqtt;
    let Some(listener) = listener else { return };
    let mut last_warning: Option<Instant> = None;
    loop {
        let stopped = std::future::poll_fn(|cx| {
            let mut c = core.borrow_mut();
            if c.edge.shutting_down {
                return Poll::Ready(None);
            }
            c.shutdown_waker = Some(cx.waker().clone());
            Poll::Pending
        });
        if accept_lead(&core.borrow()) > ACCEPT_LEAD_MAX {
            glommio::timer::sleep(ACCEPT_DEFER).await;
        }
        let accepted =
            futures_lite::future::or(async { Some(listener.accept().await) }, stopped).await;
        let Some(result) = accepted else { return };
        match result {
            Ok(stream) => {
                // The connection becomes a slot owning a descriptor of the
                // socket, watched by the core's socket ring (engine::conn).
                // TCP_NODELAY: answers are small and latency-bound; batching
                // is done per pass of the driver.
                let _ = stream.set_nodelay(true);
                let ip_key = match stream.peer_addr() {
                    Ok(peer) => {
                        let c = core.borrow();
                        let key = c.addresses.key(peer.ip());
                        match c.addresses.admit(key, mono_ms()) {
                            Ok(true) => key,
                            Ok(false) => 0,
                            Err(turned) => {
                                if say_refusal {
                                    refuse_with(stream.as_raw_fd(), turned.reason());
                                }
                                continue; // the stream closes as it drops
                            }
                        }
                    }
                    Err(_) => 0,
                };
                let fd = match sys::dup(stream.as_raw_fd()) {
                    Ok(fd) => fd,
                    Err(e) => {
                        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            tracing::warn!(error = %e, "cannot keep an accepted connection (file descriptors exhausted?)");
                            last_warning = Some(Instant::now());
                        }
                        if say_refusal {
                            refuse(stream.as_raw_fd());
                        }
                        core.borrow().addresses.release(ip_key, mono_ms());
                        continue;
                    }
                };
                drop(stream);
                let tls_conn = match &tls {
                    Some(ctx) => match crate::tls::TlsConn::new(ctx.config()) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a TLS connection");
                            crate::sockets::close(fd);
                            core.borrow().addresses.release(ip_key, mono_ms());
                            continue;
                        }
                    },
                    None => None,
                };
                let mut c = core.borrow_mut();
                let slot = c.edge.alloc_slot(fd);
                publish_connections(&c);
                match slot {
                    Some((index, _)) => {
                        let slot = c.edge.slot(index);
                        slot.tls = tls_conn;
                        slot.ip_key = ip_key;
                        if mqtt {
                            c.edge.mqtt.open(index);
                        }
                    }
                    None => {
                        if say_refusal {
                            refuse(fd); // in TLS or MQTT this would be bytes the peer cannot read
                        }
                        crate::sockets::close(fd);
                        c.addresses.release(ip_key, mono_ms());
                    }
                }
            }
            Err(e) => {
                let e = std::io::Error::from(e);
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    // Kernels that end an io_uring accept on a nonblocking
                    // listener with EAGAIN instead of waiting (5.x; see
                    // engine::ports for why it is nonblocking): poll.
                    glommio::timer::sleep(ACCEPT_AGAIN).await;
                    continue;
                }
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "accept failed (file descriptors exhausted?)");
                    last_warning = Some(Instant::now());
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// How many more client connections this core holds than the least loaded core.
fn accept_lead(c: &Core) -> u64 {
    let mine = c.edge.connections as u64;
    let shards = &c.repl.stats.shards;
    let least = (0..shards.len())
        .filter(|&i| i != c.edge.id as usize)
        .map(|i| shards[i].connections.load(Ordering::Relaxed))
        .min();
    least.map_or(0, |least| mine.saturating_sub(least))
}

fn publish_connections(c: &Core) {
    let open = c.edge.connections as u64;
    c.repl.stats.shards[c.edge.id as usize]
        .connections
        .store(open, Ordering::Relaxed);
}

/// ERROR 7 to a connection over connections_per_core_max, then close.
fn refuse(fd: RawFd) {
    refuse_with(fd, "too many connections");
}

/// ERROR 7 with `reason` (a per-address limit), before the caller closes.
fn refuse_with(fd: RawFd, reason: &str) {
    let mut out = Vec::new();
    let frame = net::ServerFrame::Error {
        code: net::error_code::TOO_MANY_CONNECTIONS,
        reason,
    };
    net::encode_server_frame(&frame, &mut out);
    let _ = crate::sockets::send(fd, &out); // best effort: the socket closes next
}

async fn mesh_receiver(core: Rc<RefCell<Core>>, rx: ConnectedReceiver<Batch>) {
    while let Some(mut batch) = rx.recv().await {
        // Replica streams become tasks here; everything else is state.
        batch.retain(|mail| match mail {
            Mail::AdoptReplica { fd, hello } => {
                crate::repl::adopt(&core, *fd, hello.clone());
                false
            }
            _ => true,
        });
        core.borrow_mut().handle_mail(batch);
    }
}

/// Sends each turn's outgoing mail, one batch per destination core.
async fn mesh_flusher(core: Rc<RefCell<Core>>, senders: Senders<Batch>) {
    loop {
        let batches = std::future::poll_fn(|cx| {
            let mut c = core.borrow_mut();
            if c.edge.outgoing_len == 0 {
                c.edge.flusher_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            c.edge.outgoing_len = 0;
            let batches: Vec<(usize, Batch)> = c
                .edge
                .outgoing
                .iter_mut()
                .enumerate()
                .filter(|(_, b)| !b.is_empty())
                .map(|(dest, b)| (dest, std::mem::take(b)))
                .collect();
            Poll::Ready(batches)
        })
        .await;
        for (dest, batch) in batches {
            if senders.send_to(dest, batch).await.is_err() {
                tracing::debug!(dest, "core mesh peer gone (shutting down)");
            }
        }
        core.borrow_mut().edge.wake_mesh_waiters();
    }
}

/// Group commit: one fdatasync (through io_uring) covers everything appended
/// before it started; STORED answers are released when it completes.
async fn committer(core: Rc<RefCell<Core>>) {
    let mut files = SyncFiles::default();
    // Test hook: the durable position after every fsync (engine::shard::DURABLE_MARK_FILE).
    let mark = std::env::var_os(crate::shard::DURABLE_MARK_ENV).and_then(|_| {
        let dir = core.borrow().shard.wal().config().dir.clone();
        std::fs::File::create(dir.join(crate::shard::DURABLE_MARK_FILE)).ok()
    });
    loop {
        std::future::poll_fn(|cx| {
            let mut c = core.borrow_mut();
            if c.shard.needs_sync() {
                Poll::Ready(())
            } else {
                c.commit_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let ticket = core.borrow_mut().shard.wal_mut().sync_begin();
        let Some(ticket) = ticket else {
            glommio::timer::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let started = Instant::now();
        let result = fdatasync_all(&mut files, &ticket).await;
        let mut c = core.borrow_mut();
        let Core {
            shard, edge, repl, ..
        } = &mut *c;
        repl.stats
            .record_fsync(started.elapsed().as_micros() as u64);
        match shard.wal_mut().sync_complete(ticket, result) {
            Ok(_) => {
                if let Some(f) = &mark {
                    use std::os::unix::fs::FileExt;
                    let text = format!("{:<20}\n", shard.wal().durable_position());
                    let _ = f.write_all_at(text.as_bytes(), 0);
                }
                shard.on_durable(edge);
                // A replica acks its new durable position at once.
                repl.wake_writers();
            }
            Err(source) => fatal_if_poisoned(&ShardError::Wal {
                shard: shard.id,
                source,
            }),
        }
        c.route_edge_mail();
    }
}

/// Files kept open for the committer's fdatasyncs, one per open WAL file
/// (by `SyncTicket::files` instance): a commit costs the sync alone, not a
/// dup and a close of the descriptor as well. Only the files the last ticket
/// named are kept, so a segment retention deleted is not held open.
#[derive(Default)]
struct SyncFiles {
    open: Vec<(u64, glommio::io::BufferedFile)>,
}

async fn fdatasync_all(files: &mut SyncFiles, ticket: &wal::SyncTicket) -> std::io::Result<()> {
    let mut index = 0;
    while index < files.open.len() {
        let instance = files.open[index].0;
        if ticket.files().any(|(named, _)| named == instance) {
            index += 1;
        } else {
            let (_, stale) = files.open.swap_remove(index);
            let _ = stale.close().await;
        }
    }
    for (instance, fd) in ticket.files() {
        let at = match files.open.iter().position(|(i, _)| *i == instance) {
            Some(at) => at,
            None => {
                files
                    .open
                    .push((instance, sys::glommio_file(sys::dup(fd)?)));
                files.open.len() - 1
            }
        };
        files.open[at]
            .1
            .fdatasync()
            .await
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

async fn maintenance(core: Rc<RefCell<Core>>, data: PathBuf) {
    let mut last_sweep = Instant::now();
    loop {
        // A handover steps through ticks (refuse, ready, commit, step
        // down): faster ticks while one is under way keep the pause short.
        let handing_over = core.borrow().repl.stats.handover_phase() != HandoverPhase::Idle;
        let tick = if handing_over {
            Duration::from_millis(crate::handover::POLL_MS)
        } else {
            MAINTENANCE_TICK
        };
        glommio::timer::sleep(tick).await;
        let mut c = core.borrow_mut();
        let now = mono_ms();
        c.edge.clock_ms = now;
        c.edge.expire_lingering();
        let follow = crate::repl::tick(&mut c, &data);
        let stats = c.repl.stats.clone();
        crate::moves::tick(&mut c, &stats.moves);
        crate::link::rehome_changed(&mut c);
        // A mode change may have delivered (and rewound) something.
        c.route_edge_mail();
        publish_connections(&c); // closes since the last accept
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            c.edge.expire_idle();
            let Core {
                addresses,
                send_buckets,
                ..
            } = &mut *c;
            crate::abuse::sweep_buckets(send_buckets, addresses.limits(), now);
            c.edge.expire_stuck_readers();
            c.shard.expire_dedup(now);
        }
        match c.shard.maybe_checkpoint() {
            Ok(true) => c.kick_committer(),
            Ok(false) => {}
            Err(e) => {
                fatal_if_poisoned(&e);
                let interval = crate::lograte::REPEATED_ERROR_LOG_INTERVAL;
                if let Some(suppressed) = c.shard.checkpoint_errors.check(interval) {
                    tracing::error!(error = %e, suppressed, "checkpoint failed; will retry (repeats logged every 5 s)");
                }
            }
        }
        if sys::SHUTDOWN.load(Ordering::SeqCst) && !c.edge.shutting_down {
            tracing::info!(
                shard = c.shard.id,
                "shutting down: no new connections or frames"
            );
            c.edge.shutting_down = true;
            if let Some(w) = c.shutdown_waker.take() {
                w.wake();
            }
        }
        drop(c);
        // Stepped down: follow the peer (spawned with no borrow held).
        if let Some(peer) = follow {
            glommio::spawn_local(crate::repl::follow(core.clone(), peer)).detach();
        }
    }
}

/// A clean stop of a primary with a connected replica hands the role over
/// first (engine::handover): the node never stops while it holds
/// acknowledged records its replica lacks. Past `timeout_ms` it stops
/// anyway and says what that means.
async fn hand_over_before_stopping(core: &Rc<RefCell<Core>>, timeout_ms: u64) {
    use crate::handover::{self, Progress};
    let stats = core.borrow().repl.stats.clone();
    let synchronous = core.borrow().repl.config.synchronous();
    // A replica connected now, or gone since (this node may be degraded,
    // holding records acknowledged alone): wait for it, up to the timeout.
    let replica_seen = stats.replica_ever_seen.load(Ordering::Relaxed)
        || stats
            .shards
            .iter()
            .any(|s| s.replica_connected.load(Ordering::Relaxed));
    if stats.role() != Role::Primary || !synchronous || !replica_seen || timeout_ms == 0 {
        return;
    }
    let _ = handover::request(&stats); // Busy: another core asked first
    let started = Instant::now();
    let timeout = Duration::from_millis(timeout_ms);
    loop {
        match handover::poll(&stats, started, timeout) {
            Progress::Waiting => {
                glommio::timer::sleep(Duration::from_millis(handover::POLL_MS)).await
            }
            Progress::Done => {
                let shard = core.borrow().shard.id;
                tracing::info!(
                    shard,
                    ms = started.elapsed().as_millis() as u64,
                    "stopping: handed over to the replica, which holds every record"
                );
                return;
            }
            Progress::Failed(e) => {
                tracing::error!(error = %e, "stopping WITHOUT a handover: the replica may lack records this node acknowledged; they are re-submitted when this node rejoins (docs/ADMIN.md, Handover)");
                return;
            }
        }
    }
}

/// Graceful stop: answer every SEND in flight (across cores), then ERROR 5 to
/// every client, flush, and return (the executor ends).
async fn shutdown(core: Rc<RefCell<Core>>, nr_cores: usize, drain_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(drain_ms);
    let pause = Duration::from_millis(5);
    while Instant::now() < deadline && core.borrow().edge.sends_in_flight_total > 0 {
        glommio::timer::sleep(pause).await;
    }
    DRAINED.fetch_add(1, Ordering::SeqCst);
    while Instant::now() < deadline && DRAINED.load(Ordering::SeqCst) < nr_cores {
        glommio::timer::sleep(pause).await;
    }
    core.borrow_mut().edge.shut_all();
    let flush_deadline = Instant::now() + SHUTDOWN_FLUSH;
    while Instant::now() < flush_deadline && core.borrow().edge.connections > 0 {
        glommio::timer::sleep(pause).await;
    }
    // Make the last ACK records durable too (not required, but saves redeliveries).
    core.borrow_mut().kick_committer();
    while Instant::now() < flush_deadline && {
        let c = core.borrow();
        c.shard.needs_sync() || c.shard.wal().syncs_in_flight() > 0
    } {
        glommio::timer::sleep(pause).await;
    }
    // A clean stop leaves a durable mark that covers every record: damage to
    // any of them on the next start is refused, never taken for a torn tail.
    let sealed = {
        let mut c = core.borrow_mut();
        let in_flight = c.shard.wal().syncs_in_flight();
        (in_flight == 0).then(|| c.shard.wal_mut().seal())
    };
    match sealed {
        Some(Ok(position)) => {
            tracing::info!(position, "WAL sealed: the durable mark covers every record")
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "cannot seal the WAL; the next start treats the last commit as a crash tail")
        }
        None => tracing::warn!("a WAL sync still in flight at exit: not sealed"),
    }
    tracing::info!(shard = core.borrow().shard.id, "core stopped");
}
