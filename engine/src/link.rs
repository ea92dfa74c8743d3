//! Node links: the edge-to-core interface (engine::core's `Mail`) between
//! processes, over TCP (engine::link_proto frames, batched per event-loop
//! turn).
//!
//! - Core side: a node-link listener on every core of a core node; an
//!   accepted link is served by the core that accepted it. Requests go to
//!   the users' shards like a local connection's; answers come back through
//!   `Edge::links_in` (a `ConnRef` with a link id).
//! - Edge side: every core of an edge (or of a core node, for users of other
//!   pairs) keeps a link to every node of every other pair, learns from each
//!   which one is primary (WELCOME, then ROLE on every change), and writes
//!   requests to the primary with the highest epoch (engine::route). When
//!   that changes, it registers its connections' logins there and sends
//!   every unanswered SEND again: clients see a pause, not an error.

use crate::clock::wall_ms;
use crate::cluster::{ClusterSpec, PeerRole};
use crate::core::{Core, Mail};
use crate::link_proto::{self as proto, Conn, HelloKind, Msg};
use crate::shard::{ConnRef, Sink};
use crate::stats::{NodeStats, Role};
use crate::sys;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// A HELLO or WELCOME is small: a peer is not buffered beyond this before it.
const HANDSHAKE_BYTES_MAX: usize = 512;
/// How long a peer may take to say HELLO / WELCOME.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// An edge pings an idle link this often...
const PING_EVERY: Duration = Duration::from_millis(500);
/// ...and drops it when nothing was heard for this long.
const SILENCE_MAX: Duration = Duration::from_secs(3);
/// Reconnection backoff of an edge's link to a node.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often a core link writer looks at the node's role (ROLE on change).
const ROLE_POLL: Duration = Duration::from_millis(20);
/// Bytes one link write carries at most.
const BATCH_BYTES_MAX: usize = 1 << 20;
/// Initial read buffer of a link; it grows to one whole frame at most.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// What a core node tells the edges that link to it.
#[derive(Clone)]
pub struct CoreIdentity {
    pub topology: u64,
    pub node: Rc<str>,
    pub pair: u16,
    pub stats: Arc<NodeStats>,
    /// Largest link frame read: the node's frame_len_max plus the ids around it.
    pub frame_max: usize,
    /// The node's own log's slot decisions (engine::slots::Ownership),
    /// told to every edge (MOVED) while the node is primary: what its log
    /// holds in force, never what it heard from other nodes, so an edge
    /// sends a range's requests to a pair only once that pair serves it.
    pub own_slots: Arc<crate::slots::SlotTable>,
}

/// Every slot decision the node knows, as MOVED frames.
fn encode_decisions(slots: &crate::slots::SlotTable, out: &mut Vec<u8>) {
    for r in slots.decisions() {
        proto::encode(&Msg::Moved(r), out);
    }
}

impl CoreIdentity {
    fn role(&self) -> (bool, u64) {
        (
            self.stats.role() == Role::Primary,
            self.stats.epoch.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

/// Reads until `buf[..*pending]` holds a whole frame (at most `max` bytes);
/// returns its length.
async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    pending: &mut usize,
    max: usize,
) -> Result<usize, String> {
    loop {
        if let Some(len) = proto::frame_len(&buf[..*pending]).map_err(|e| e.to_string())? {
            if len > max {
                return Err(format!("link frame of {len} bytes over {max}"));
            }
            return Ok(len);
        }
        if *pending == buf.len() {
            if buf.len() >= max {
                return Err(format!("link frame over {max} bytes"));
            }
            buf.resize((buf.len() * 2).clamp(64, max), 0);
        }
        let n = stream
            .read(&mut buf[*pending..])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("peer closed the link".into());
        }
        *pending += n;
    }
}

async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(limit).await;
        Err(format!("no answer within {limit:?}"))
    })
    .await
}

fn consume(buf: &mut [u8], pending: &mut usize, used: usize) {
    buf.copy_within(used..*pending, 0);
    *pending -= used;
}

// ------------------------------------------------------------- core side

/// Accepts node links on one core (each core holds a dup of the listener).
pub async fn acceptor(core: Rc<RefCell<Core>>, listener: TcpListener, me: CoreIdentity) {
    // Never cancelled while waiting: dropping an io_uring accept that already
    // completed in the kernel would strand a connection nobody serves (an
    // edge then waits out its handshake timeout). The task ends with the
    // executor.
    loop {
        match listener.accept().await {
            Ok(stream) => {
                if core.borrow().edge.shutting_down {
                    continue; // dropped: the edge reconnects elsewhere
                }
                let _ = stream.set_nodelay(true);
                glommio::spawn_local(serve(core.clone(), stream, me.clone())).detach();
            }
            Err(e) => {
                tracing::warn!(error = %e, "node link accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Serves one link from its HELLO on (plain, or the plaintext end of a
/// mutual-TLS pump: engine::node_tls).
pub async fn serve(core: Rc<RefCell<Core>>, mut stream: TcpStream, me: CoreIdentity) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let mut buf = vec![0u8; 256];
    let mut pending = 0;
    let hello = within(
        HANDSHAKE_TIMEOUT,
        read_frame(&mut stream, &mut buf, &mut pending, HANDSHAKE_BYTES_MAX),
    )
    .await;
    let refuse = |reason: String| {
        let mut out = Vec::new();
        proto::encode(&Msg::Refuse { reason: &reason }, &mut out);
        out
    };
    let (kind, name) = match hello.and_then(|len| {
        proto::decode(&buf[..len])
            .map_err(|e| e.to_string())
            .map(|m| (m, len))
    }) {
        Ok((
            Some((
                Msg::Hello {
                    kind,
                    topology,
                    name,
                },
                _,
            )),
            len,
        )) => {
            if topology != me.topology {
                let reason = format!(
                    "cluster topology mismatch: {name} has {topology:016x}, node {} has {:016x}; give both the same cluster file",
                    me.node, me.topology
                );
                tracing::error!(peer, "{reason}");
                let out = refuse(reason);
                let _ = stream.write_all(&out).await;
                return;
            }
            let name = name.to_string();
            consume(&mut buf, &mut pending, len);
            (kind, name)
        }
        Ok(_) => {
            tracing::warn!(peer, "node link: the first frame is not HELLO; closed");
            return;
        }
        Err(e) => {
            tracing::warn!(peer, error = %e, "node link: bad HELLO; closed");
            return;
        }
    };
    let (primary, epoch) = me.role();
    let mut welcome = Vec::new();
    proto::encode(
        &Msg::Welcome {
            primary,
            epoch,
            pair: me.pair,
            node: &me.node,
        },
        &mut welcome,
    );
    if kind == HelloKind::Probe {
        // A probe reads the WELCOME alone.
        let _ = stream.write_all(&welcome).await;
        return;
    }
    let Some(link) = core.borrow_mut().edge.add_link() else {
        tracing::warn!(peer, "node links at their bound on this core: refused");
        let out = refuse("node links at their bound".into());
        let _ = stream.write_all(&out).await;
        return;
    };
    let decisions = me.own_slots.changes();
    if primary {
        encode_decisions(&me.own_slots, &mut welcome);
    }
    core.borrow_mut()
        .edge
        .links_in
        .get_mut(&link)
        .expect("just added")
        .out = welcome;
    tracing::info!(peer, edge = %name, link, "edge linked");
    let (reader, writer) = match sys::split(stream) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "cannot split a node link");
            core.borrow_mut().edge.links_in.remove(&link);
            return;
        }
    };
    let known = (primary, epoch, decisions);
    let writing = write_answers(core.clone(), writer, link, me.clone(), known);
    let reading = read_requests(core.clone(), reader, link, buf, pending, me.frame_max);
    let why = futures_lite::future::or(writing, reading).await;
    tracing::info!(peer, edge = %name, link, reason = %why, "edge link closed");
    core.borrow_mut().link_closed(link);
}

async fn write_answers(
    core: Rc<RefCell<Core>>,
    mut writer: TcpStream,
    link: u16,
    me: CoreIdentity,
    mut told: (bool, u64, u64),
) -> String {
    loop {
        let batch = {
            let mut c = core.borrow_mut();
            let Some(l) = c.edge.links_in.get_mut(&link) else {
                return "closed".into();
            };
            if l.broken {
                return "over its bound".into();
            }
            let role = me.role();
            let decisions = me.own_slots.changes();
            if (role.0, role.1) != (told.0, told.1) {
                let msg = Msg::Role {
                    primary: role.0,
                    epoch: role.1,
                };
                proto::encode(&msg, &mut l.out);
            }
            if role.0 && (role.0, role.1, decisions) != told {
                // With a role change too: a promoted replica learned its
                // primary's decisions from the stream, never told.
                encode_decisions(&me.own_slots, &mut l.out);
            }
            told = (role.0, role.1, decisions);
            std::mem::take(&mut l.out)
        };
        if batch.is_empty() {
            // Wait for answers, or look at the role again shortly.
            let woken = std::future::poll_fn(|cx| {
                let mut c = core.borrow_mut();
                match c.edge.links_in.get_mut(&link) {
                    Some(l) if l.out.is_empty() && !l.broken => {
                        l.waker = Some(cx.waker().clone());
                        std::task::Poll::Pending
                    }
                    _ => std::task::Poll::Ready(()),
                }
            });
            futures_lite::future::or(woken, glommio::timer::sleep(ROLE_POLL)).await;
            continue;
        }
        let write = async {
            writer
                .write_all(&batch)
                .await
                .map_err(|e| format!("write failed: {e}"))
        };
        if let Err(e) = within(SILENCE_MAX, write).await {
            return e;
        }
        let mut c = core.borrow_mut();
        if let Some(l) = c.edge.links_in.get_mut(&link) {
            if l.out.is_empty() && l.out.capacity() < batch.capacity() {
                let mut batch = batch;
                batch.clear();
                l.out = batch; // keep the larger buffer
            }
        }
    }
}

async fn read_requests(
    core: Rc<RefCell<Core>>,
    mut reader: TcpStream,
    link: u16,
    mut buf: Vec<u8>,
    mut pending: usize,
    frame_max: usize,
) -> String {
    buf.resize(READ_BUFFER_BYTES.min(frame_max), 0);
    loop {
        // Back-pressure: no more requests while their answers could not leave.
        loop {
            let wait = {
                let c = core.borrow();
                let l = c.edge.links_in.get(&link);
                // Only the mesh to this node's own shards: an edge's requests
                // never wait on this node's own routes to other pairs.
                c.edge.outgoing_len >= c.edge.limits.mesh_outgoing_max
                    || c.edge.shutting_down
                    || l.is_none_or(|l| l.out.len() > crate::core::LINK_OUT_BYTES_MAX / 2)
            };
            if !wait {
                break;
            }
            if core
                .borrow()
                .edge
                .links_in
                .get(&link)
                .is_none_or(|l| l.broken)
            {
                return "closed".into();
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        // An edge pings every PING_EVERY: silence means it is gone or paused.
        let read = read_frame(&mut reader, &mut buf, &mut pending, frame_max);
        let len = match within(SILENCE_MAX, read).await {
            Ok(len) => len,
            Err(e) => return e,
        };
        let mut c = core.borrow_mut();
        let mut used = 0;
        // Everything already read is handled in this turn (one batch).
        let mut next = Some(len);
        while let Some(len) = next {
            match proto::decode(&buf[used..used + len]) {
                Ok(Some((msg, _))) => {
                    if let Err(e) = handle_request(&mut c, link, msg) {
                        return e;
                    }
                }
                Ok(None) => unreachable!("whole frame"),
                Err(e) => {
                    tracing::warn!(error = %e, "bad bytes on a node link: closed");
                    return e.to_string();
                }
            }
            used += len;
            next = match proto::frame_len(&buf[used..pending]) {
                Ok(Some(n)) if n <= frame_max => Some(n),
                _ => None,
            };
        }
        c.kick_committer();
        drop(c);
        consume(&mut buf, &mut pending, used);
    }
}

/// One request from an edge, handed to the user's shard like a local
/// connection's.
fn handle_request(c: &mut Core, link: u16, msg: Msg<'_>) -> Result<(), String> {
    let conn_ref = |conn: Conn| ConnRef {
        core: c.edge.id,
        link,
        slot: conn.slot,
        generation: conn.generation,
    };
    let (user, mail) = match msg {
        Msg::Login { conn, user } => (
            user,
            Mail::Login {
                conn: conn_ref(conn),
                user: user.into(),
            },
        ),
        Msg::Send {
            conn,
            msg_id,
            sent_ms,
            sender,
            to,
            body,
        } => (
            to,
            Mail::Send {
                reply: conn_ref(conn),
                sender: sender.into(),
                msg_id,
                to: to.into(),
                sent_ms,
                body: body.into(),
            },
        ),
        Msg::Ack { seq, user } => (
            user,
            Mail::Ack {
                user: user.into(),
                seq,
            },
        ),
        Msg::Logout { conn, user } => (
            user,
            Mail::Logout {
                conn: conn_ref(conn),
                user: user.into(),
            },
        ),
        Msg::Rewind { conn, seq, user } => (
            user,
            Mail::Rewind {
                conn: conn_ref(conn),
                user: user.into(),
                seq,
            },
        ),
        Msg::Resume { conn, user } => (
            user,
            Mail::Resume {
                conn: conn_ref(conn),
                user: user.into(),
            },
        ),
        Msg::Sync { conn, nonce, user } => (
            user,
            Mail::Sync {
                conn: conn_ref(conn),
                nonce,
            },
        ),
        Msg::Ping { now_ms } => {
            if let Some(l) = c.edge.links_in.get_mut(&link) {
                proto::encode(&Msg::Pong { now_ms }, &mut l.out);
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
            }
            return Ok(());
        }
        other => return Err(format!("an edge sent {other:?} on a node link")),
    };
    // Every user id field was checked by the decoder (link_proto's
    // `Cursor::user`): a bad one closed the link before reaching here.
    let dest = c.edge.shard_of(user);
    if dest == c.edge.id {
        c.handle_one(mail);
    } else {
        c.edge.post(dest, mail);
    }
    Ok(())
}

// ------------------------------------------------------------- edge side

/// Keeps this core's link to node `node` of pair `pair`, for as long as the
/// core runs.
pub async fn keep_link(core: Rc<RefCell<Core>>, pair: u16, node: usize) {
    let (addr, hello) = {
        let c = core.borrow();
        let links = c.edge.remote.as_ref().expect("an edge core has routes");
        let addr = links.cluster.pairs[pair as usize].nodes[node].link;
        let mut hello = Vec::new();
        proto::encode(
            &Msg::Hello {
                kind: HelloKind::Edge,
                topology: links.cluster.topology_hash,
                name: &links.name,
            },
            &mut hello,
        );
        (addr, hello)
    };
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        if core.borrow().edge.shutting_down {
            return;
        }
        match session(&core, pair, node, addr, &hello).await {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => {
                if e != last_error {
                    tracing::info!(pair, node, %addr, error = %e, "node link down");
                    last_error = e;
                }
            }
        }
        set_node(&core, pair, node, false, false, 0);
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection to a node: HELLO, WELCOME, then requests out and answers in.
async fn session(
    core: &Rc<RefCell<Core>>,
    pair: u16,
    node: usize,
    addr: std::net::SocketAddr,
    hello: &[u8],
) -> Result<(), String> {
    let tls = core.borrow().repl.node_tls.clone();
    let mut stream = match tls {
        // Mutual TLS on a pump thread; this end is plaintext (engine::node_tls).
        Some(tls) => crate::node_tls::dial(&addr.to_string(), &tls)
            .map(sys::tcp_stream)
            .map_err(|e| e.to_string())?,
        None => {
            within(HANDSHAKE_TIMEOUT, async {
                TcpStream::connect(addr).await.map_err(|e| e.to_string())
            })
            .await?
        }
    };
    let _ = stream.set_nodelay(true);
    stream.write_all(hello).await.map_err(|e| e.to_string())?;
    let frame_max = core.borrow().edge.limits.frame_len_max as usize + 1024;
    let mut buf = vec![0u8; READ_BUFFER_BYTES.min(frame_max)];
    let mut pending = 0;
    let len = within(
        HANDSHAKE_TIMEOUT,
        read_frame(&mut stream, &mut buf, &mut pending, HANDSHAKE_BYTES_MAX),
    )
    .await?;
    match proto::decode(&buf[..len]).map_err(|e| e.to_string())? {
        Some((Msg::Welcome { primary, epoch, .. }, _)) => {
            consume(&mut buf, &mut pending, len);
            set_node(core, pair, node, true, primary, epoch);
        }
        Some((Msg::Refuse { reason }, _)) => {
            let reason = reason.to_string();
            tracing::error!(pair, node, %addr, %reason, "node refused the link");
            return Err(reason);
        }
        other => return Err(format!("unexpected first frame {other:?}")),
    }
    let (reader, writer) = sys::split(stream).map_err(|e| e.to_string())?;
    let heard = Rc::new(std::cell::Cell::new(std::time::Instant::now()));
    let writing = write_requests(core.clone(), writer, pair, node, heard.clone());
    let reading = read_answers(
        core.clone(),
        reader,
        pair,
        node,
        buf,
        pending,
        frame_max,
        heard,
    );
    futures_lite::future::or(writing, reading).await
}

fn set_node(core: &Rc<RefCell<Core>>, pair: u16, node: usize, up: bool, primary: bool, epoch: u64) {
    let mut c = core.borrow_mut();
    let links = c.edge.remote.as_mut().expect("routes");
    if links.set_node(pair, node, up, primary, epoch) {
        tracing::info!(pair, node, epoch, "pair primary: requests go there");
        reregister(&mut c, pair);
    }
    c.edge.wake_mesh_waiters();
}

/// An edge with etcd: pairs whose leader epoch rose drop stale nodes and
/// re-register at the elected one once it announces itself.
pub fn follow_elected(c: &mut Core) {
    let Some(links) = c.edge.remote.as_mut() else {
        return;
    };
    for (pair, activated) in links.follow_elected() {
        tracing::info!(
            pair,
            activated,
            "etcd elected another primary: requests follow it"
        );
        if activated {
            reregister(c, pair);
        }
    }
}

/// After the pair's primary changed: every connection of a user of that pair
/// that logged in (or is logging in) does so again there, first.
fn reregister(c: &mut Core, pair: u16) {
    // PINGs waiting for their ACKs to take effect on the old primary are
    // answered now: those ACKs may be lost with it (a redelivery, which the
    // protocol allows after a failover).
    let syncs = c.edge.remote.as_mut().expect("routes").take_syncs(pair);
    for (conn, nonce) in syncs {
        let conn = ConnRef {
            core: c.edge.id,
            link: 0,
            slot: conn.slot,
            generation: conn.generation,
        };
        c.edge.pong(conn, nonce);
    }
    let mut frames = Vec::new();
    for (index, generation, user) in logged_in(c) {
        let links = c.edge.remote.as_ref().expect("routes");
        if links.remote_pair(&user) != Some(pair) {
            continue;
        }
        login_frames(c, index, generation, &user, &mut frames);
    }
    c.edge
        .remote
        .as_mut()
        .expect("routes")
        .prepend(pair, frames);
}

/// This core's connections that logged in (or are logging in): slot,
/// generation, user.
fn logged_in(c: &mut Core) -> Vec<(u32, u32, Box<str>)> {
    let mut out = Vec::new();
    for index in 0..c.edge.slot_count() as u32 {
        let slot = c.edge.slot(index);
        let open = matches!(
            slot.state,
            crate::core::SlotState::Ready | crate::core::SlotState::AwaitWelcome
        );
        // An MQTT connection is logged in only while it subscribes.
        let open = open && c.edge.mqtt.receives(index);
        let slot = c.edge.slot(index);
        if let (true, Some(user)) = (open, &slot.user) {
            out.push((index, slot.generation, Box::from(&**user)));
        }
    }
    out
}

/// A connection's login, for a node that has not seen it: LOGIN, and if its
/// deliveries were rewound, where to start again and whether its outbox
/// drained meanwhile.
fn login_frames(c: &mut Core, index: u32, generation: u32, user: &str, frames: &mut Vec<u8>) {
    let conn = Conn {
        slot: index,
        generation,
    };
    // The client's last ACK first (it may have been lost with the old
    // primary): the login then delivers from there.
    if let Some(seq) = c.edge.slot(index).acked_seq() {
        proto::encode(&Msg::Ack { seq, user }, frames);
    }
    proto::encode(&Msg::Login { conn, user }, frames);
    let (blocked, expected) = {
        let slot = c.edge.slot(index);
        (
            slot.deliver_blocked_since_ms != 0,
            slot.deliver_expected_seq,
        )
    };
    if expected != 0 {
        let rewind = Msg::Rewind {
            conn,
            seq: expected,
            user,
        };
        proto::encode(&rewind, frames);
        if !blocked {
            proto::encode(&Msg::Resume { conn, user }, frames);
        }
    }
}

/// Re-homes the slots whose routing a slot decision changed (a MOVED heard
/// on this core, or a decision applied by another core or the shard).
pub fn rehome_changed(c: &mut Core) {
    let Some(links) = c.edge.remote.as_mut() else {
        return;
    };
    for (first, last) in links.changed_ranges() {
        rehome(c, first, last);
    }
}

/// A slot decision heard or made (engine::slots): the unanswered SENDs to
/// users of slots first..=last go to the pair that takes them now (again,
/// even to the same pair: one that answered RETRY kept none), and this
/// core's connections of those users log in there. A node that no longer
/// holds a user ignores its requests; msg_id dedup makes a SEND written
/// twice safe, and the seq filter a delivery sent twice.
pub fn rehome(c: &mut Core, first: u16, last: u16) {
    let id = c.edge.id;
    let links = c.edge.remote.as_mut().expect("routes");
    let taken = links.take_sends_in(first, last);
    let (mut remote, mut local) = (0, 0);
    for (frame, copies) in taken {
        let links = c.edge.remote.as_mut().expect("routes");
        let Ok(Some((Msg::Send { to, .. }, _))) = proto::decode(&frame) else {
            unreachable!("a SEND frame")
        };
        if let Some(pair) = links.send_pair(to) {
            links.push_send_frame(pair, frame, copies);
            remote += 1;
            continue;
        }
        // This node's pair serves the slot now: to the local shard.
        let Ok(Some((
            Msg::Send {
                conn,
                msg_id,
                sender,
                to,
                body,
                ..
            },
            _,
        ))) = proto::decode(&frame)
        else {
            unreachable!("a SEND frame")
        };
        let reply = ConnRef {
            core: id,
            link: 0,
            slot: conn.slot,
            generation: conn.generation,
        };
        for _ in 0..copies {
            c.route_send(reply, sender, msg_id, to, body);
        }
        local += 1;
    }
    let mut logins = 0;
    for (index, generation, user) in logged_in(c) {
        if !(first..=last).contains(&net::slot_of(&user)) {
            continue;
        }
        logins += 1;
        let links = c.edge.remote.as_ref().expect("routes");
        if let Some(pair) = links.remote_pair(&user) {
            let mut frames = Vec::new();
            login_frames(c, index, generation, &user, &mut frames);
            let links = c.edge.remote.as_mut().expect("routes");
            links.push_frames(pair, frames);
            continue;
        }
        let conn = ConnRef {
            core: id,
            link: 0,
            slot: index,
            generation,
        };
        if let Some(seq) = c.edge.slot(index).acked_seq() {
            c.route_ack(&user, seq);
        }
        c.route_login(conn, &user);
        let (blocked, expected) = {
            let slot = c.edge.slot(index);
            (
                slot.deliver_blocked_since_ms != 0,
                slot.deliver_expected_seq,
            )
        };
        if expected != 0 {
            let rewind = Mail::Rewind {
                conn,
                user: user.clone(),
                seq: expected,
            };
            c.edge.pending_local.push_back(rewind);
            if !blocked {
                c.edge.pending_local.push_back(Mail::Resume { conn, user });
            }
        }
    }
    c.route_edge_mail();
    c.edge.wake_mesh_waiters();
    tracing::info!(
        core = id,
        first,
        last,
        remote,
        local,
        logins,
        "slot decision: requests re-homed"
    );
}

async fn write_requests(
    core: Rc<RefCell<Core>>,
    mut writer: TcpStream,
    pair: u16,
    node: usize,
    heard: Rc<std::cell::Cell<std::time::Instant>>,
) -> Result<(), String> {
    let mut last_ping = std::time::Instant::now();
    loop {
        // A node that stopped answering (paused, cut off) is dropped even
        // while requests keep flowing: PINGs go out every PING_EVERY whatever
        // else does, and every PONG or answer counts as heard.
        if heard.get().elapsed() > SILENCE_MAX {
            return Err(format!("node silent for {SILENCE_MAX:?}"));
        }
        let mut batch = {
            let mut c = core.borrow_mut();
            let links = c.edge.remote.as_mut().expect("routes");
            let batch = links.take_batch(pair, node, BATCH_BYTES_MAX);
            if batch.is_some() {
                c.edge.wake_mesh_waiters();
            }
            batch
        };
        if last_ping.elapsed() >= PING_EVERY {
            last_ping = std::time::Instant::now();
            let out = batch.get_or_insert_with(Vec::new);
            proto::encode(&Msg::Ping { now_ms: wall_ms() }, out);
        }
        let Some(batch) = batch else {
            let woken = std::future::poll_fn(|cx| {
                let mut c = core.borrow_mut();
                let links = c.edge.remote.as_mut().expect("routes");
                if links.has_batch(pair, node) {
                    return std::task::Poll::Ready(());
                }
                links.pairs[pair as usize].nodes[node].waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            });
            futures_lite::future::or(woken, glommio::timer::sleep(PING_EVERY)).await;
            continue;
        };
        // A write that cannot finish (the node stopped reading) is bounded too.
        within(SILENCE_MAX, async {
            writer
                .write_all(&batch)
                .await
                .map_err(|e| format!("write failed: {e}"))
        })
        .await?;
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_answers(
    core: Rc<RefCell<Core>>,
    mut reader: TcpStream,
    pair: u16,
    node: usize,
    mut buf: Vec<u8>,
    mut pending: usize,
    frame_max: usize,
    heard: Rc<std::cell::Cell<std::time::Instant>>,
) -> Result<(), String> {
    loop {
        let len = read_frame(&mut reader, &mut buf, &mut pending, frame_max).await?;
        heard.set(std::time::Instant::now());
        let mut c = core.borrow_mut();
        let mut used = 0;
        let mut next = Some(len);
        while let Some(len) = next {
            match proto::decode(&buf[used..used + len]) {
                Ok(Some((msg, _))) => {
                    if let Some((primary, epoch)) = handle_answer(&mut c, pair, msg)? {
                        drop(c);
                        set_node(&core, pair, node, true, primary, epoch);
                        c = core.borrow_mut();
                    }
                }
                Ok(None) => unreachable!("whole frame"),
                Err(e) => return Err(format!("bad bytes from a node: {e}")),
            }
            used += len;
            next = match proto::frame_len(&buf[used..pending]) {
                Ok(Some(n)) if n <= frame_max => Some(n),
                _ => None,
            };
        }
        c.route_edge_mail();
        drop(c);
        consume(&mut buf, &mut pending, used);
    }
}

/// One answer from a pair's node, given to the connection it is for.
/// Returns the node's new role when it announced one.
fn handle_answer(c: &mut Core, pair: u16, msg: Msg<'_>) -> Result<Option<(bool, u64)>, String> {
    let id = c.edge.id;
    let local = |conn: Conn| ConnRef {
        core: id,
        link: 0,
        slot: conn.slot,
        generation: conn.generation,
    };
    if let Msg::Moved(r) = msg {
        let slots = &c.edge.remote.as_ref().expect("routes").slots;
        if !slots.valid(&r) {
            return Err(format!(
                "a node sent a slot decision for a pair not in the cluster file: {r:?}"
            ));
        }
        slots.apply(&r);
        rehome_changed(c);
        let links = c.edge.remote.as_mut().expect("routes");
        if links.rewrite_retried_in(pair, r.first, r.last) > 0 {
            c.edge.wake_mesh_waiters();
        }
        return Ok(None);
    }
    let links = c.edge.remote.as_mut().expect("routes");
    match msg {
        Msg::Stored { conn, msg_id } => {
            for _ in 0..links.answered(pair, conn, msg_id) {
                c.edge.stored(local(conn), msg_id);
            }
        }
        Msg::Rejected {
            conn,
            msg_id,
            code,
            reason,
        } => {
            for _ in 0..links.answered(pair, conn, msg_id) {
                c.edge.rejected(local(conn), msg_id, code, reason);
            }
        }
        Msg::Retry { conn, msg_id } => {
            // Kept: written again to the next primary with the other
            // unanswered SENDs, or to this one once it tells a slot decision.
            links.retried(pair, conn, msg_id);
        }
        Msg::WelcomeUser { conn, pending } => c.edge.welcome(local(conn), pending),
        Msg::Synced { conn, nonce } => {
            if links.synced(pair, conn, nonce) {
                c.edge.pong(local(conn), nonce);
            }
        }
        Msg::Deliver {
            conn,
            seq,
            msg_id,
            sent_ms,
            from,
            body,
        } => c
            .edge
            .deliver_remote(local(conn), seq, msg_id, from, sent_ms, body),
        Msg::Role { primary, epoch } => return Ok(Some((primary, epoch))),
        Msg::Pong { .. } => {}
        other => return Err(format!("a node sent {other:?} on a node link")),
    }
    Ok(None)
}

// ------------------------------------------------------------- startup probe

/// Asks `addr` (a node's link listener) for its role, blocking, at startup.
/// A peer that refuses (another topology) is an error: starting anyway could
/// make a second primary.
pub fn probe(
    addr: std::net::SocketAddr,
    spec: &ClusterSpec,
    name: &str,
    tls: Option<&Arc<crate::node_tls::NodeTls>>,
) -> Result<PeerRole, String> {
    match tls {
        Some(tls) => {
            // Nobody listening: unreachable. (The TLS dial below reports a
            // refused connection only as an end of stream.)
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
                return Ok(PeerRole::Unreachable);
            }
            // Mutual TLS on a pump thread; this end is plaintext.
            let Ok(fd) = crate::node_tls::dial(&addr.to_string(), tls) else {
                return Ok(PeerRole::Unreachable);
            };
            let s = sys::unix_stream(fd);
            let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT * 2));
            exchange_probe(s, addr, spec, name)
        }
        None => {
            let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            else {
                return Ok(PeerRole::Unreachable);
            };
            let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
            exchange_probe(s, addr, spec, name)
        }
    }
}

fn exchange_probe(
    mut s: impl std::io::Read + std::io::Write,
    addr: std::net::SocketAddr,
    spec: &ClusterSpec,
    name: &str,
) -> Result<PeerRole, String> {
    let mut hello = Vec::new();
    proto::encode(
        &Msg::Hello {
            kind: HelloKind::Probe,
            topology: spec.topology_hash,
            name,
        },
        &mut hello,
    );
    if s.write_all(&hello).is_err() {
        return Ok(PeerRole::Unreachable);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while buf.len() < HANDSHAKE_BYTES_MAX {
        match s.read(&mut chunk) {
            // Connected but no answer: the peer may be a primary that is
            // slow; starting as primary on a guess could make a second one.
            Ok(0) | Err(_) => {
                return Err(format!(
                    "the peer node at {addr} accepted the startup probe but did not answer; \
                     start this node again once the peer answers (or stop the peer)"
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        match proto::decode(&buf) {
            Ok(None) => continue,
            Ok(Some((
                Msg::Welcome {
                    primary: true,
                    epoch,
                    ..
                },
                _,
            ))) => return Ok(PeerRole::Primary { epoch }),
            Ok(Some((Msg::Welcome { .. }, _))) => return Ok(PeerRole::NotPrimary),
            Ok(Some((Msg::Refuse { reason }, _))) => {
                return Err(format!(
                    "the peer node at {addr} refused this node: {reason}"
                ))
            }
            _ => return Ok(PeerRole::Unreachable),
        }
    }
    Ok(PeerRole::Unreachable)
}
