//! The cluster file: which core pairs exist, their nodes' addresses, and
//! which pair owns each of the 16384 slots (docs/CLUSTER.md, field by field).
//! Topology is configuration: adding a pair is an edit of this file.
//!
//! Every node link handshake carries [`Cluster::topology_hash`]; two
//! processes whose files disagree on the pairs, the nodes' addresses or the
//! slot map refuse each other.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

/// Core pairs in one cluster file (each takes a u16 in the slot map and on
/// the link).
pub const PAIRS_MAX: usize = 1024;
/// Nodes of a pair: a primary and its replica (one node: no replica).
pub const NODES_PER_PAIR_MAX: usize = 2;
/// Bytes of a cluster file read at start.
pub const FILE_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// etcd endpoints for automatic failover (comma-separated `http://HOST:PORT`).
    #[serde(default)]
    pub etcd: Option<String>,
    /// This cluster's key prefix in etcd. [default: "iris"]
    #[serde(default)]
    pub etcd_prefix: Option<String>,
    /// The operator token file every node of the cluster uses for its admin
    /// API, and every `iris admin … --cluster FILE` sends (relative to the
    /// cluster file's directory).
    #[serde(default)]
    pub admin_token_file: Option<std::path::PathBuf>,
    pub pairs: Vec<PairSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSpec {
    pub name: String,
    /// Slot ranges, `"A-B"` (inclusive) or `"N"`.
    pub slots: Vec<String>,
    /// The first node starts as the primary when neither node is running yet.
    pub nodes: Vec<NodeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// Client listener (clients may connect to a core directly).
    pub client: SocketAddr,
    /// Node-link listener: edges (and the peer's startup probe) connect here.
    pub link: SocketAddr,
    /// Replication listener (the peer follows it while it is primary).
    pub replication: SocketAddr,
    /// Admin HTTP.
    pub admin: SocketAddr,
}

/// A validated cluster file.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub pairs: Vec<PairSpec>,
    /// slot → pair index.
    pub slot_map: std::rc::Rc<[u16]>,
    pub topology_hash: u64,
}

// The slot map is shared per core (Rc); a Cluster crosses threads only as
// its file's parsed form.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub etcd: Option<String>,
    pub etcd_prefix: Option<String>,
    /// As written in the file; [`ClusterSpec::load`] makes a relative path
    /// relative to the file's directory.
    pub admin_token_file: Option<std::path::PathBuf>,
    pub pairs: Vec<PairSpec>,
    pub slot_map: Vec<u16>,
    pub topology_hash: u64,
}

impl ClusterSpec {
    pub fn load(path: &Path) -> Result<ClusterSpec, String> {
        let len = std::fs::metadata(path)
            .map_err(|e| format!("cannot read cluster file {}: {e}", path.display()))?
            .len();
        if len > FILE_BYTES_MAX {
            return Err(format!(
                "cluster file {} is over {FILE_BYTES_MAX} bytes",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read cluster file {}: {e}", path.display()))?;
        let mut spec = ClusterSpec::parse(&text)
            .map_err(|e| format!("cluster file {}: {e}", path.display()))?;
        if let (Some(token), Some(dir)) = (&spec.admin_token_file, path.parent()) {
            spec.admin_token_file = Some(dir.join(token));
        }
        Ok(spec)
    }

    pub fn parse(text: &str) -> Result<ClusterSpec, String> {
        let file: ClusterFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.pairs.is_empty() || file.pairs.len() > PAIRS_MAX {
            return Err(format!("1 to {PAIRS_MAX} pairs, not {}", file.pairs.len()));
        }
        let mut names = std::collections::HashSet::new();
        let mut addrs = std::collections::HashSet::new();
        let mut slot_map = vec![u16::MAX; net::SLOT_COUNT as usize];
        for (index, pair) in file.pairs.iter().enumerate() {
            if !names.insert(pair.name.clone()) {
                return Err(format!("the name {:?} is used twice", pair.name));
            }
            if pair.nodes.is_empty() || pair.nodes.len() > NODES_PER_PAIR_MAX {
                return Err(format!(
                    "pair {:?}: 1 or {NODES_PER_PAIR_MAX} nodes, not {}",
                    pair.name,
                    pair.nodes.len()
                ));
            }
            for node in &pair.nodes {
                if !names.insert(node.name.clone()) {
                    return Err(format!("the name {:?} is used twice", node.name));
                }
                for addr in [node.client, node.link, node.replication, node.admin] {
                    if addr.port() == 0 || !addrs.insert(addr) {
                        return Err(format!(
                            "node {:?}: address {addr} is port 0 or used twice",
                            node.name
                        ));
                    }
                }
            }
            for range in &pair.slots {
                let (a, b) = parse_range(range)
                    .ok_or_else(|| format!("pair {:?}: bad slot range {range:?}", pair.name))?;
                for slot in a..=b {
                    if slot_map[slot as usize] != u16::MAX {
                        return Err(format!("slot {slot} is given to two pairs"));
                    }
                    slot_map[slot as usize] = index as u16;
                }
            }
        }
        if let Some(slot) = slot_map.iter().position(|&p| p == u16::MAX) {
            return Err(format!("slot {slot} belongs to no pair"));
        }
        let topology_hash = topology_hash(&file.pairs, &slot_map);
        if let Some(p) = &file.etcd_prefix {
            if p.is_empty() || p.len() > 256 || p.contains(char::is_whitespace) {
                return Err(format!("etcd_prefix {p:?}: 1 to 256 characters, no spaces"));
            }
        }
        Ok(ClusterSpec {
            etcd: file.etcd,
            etcd_prefix: file.etcd_prefix,
            admin_token_file: file.admin_token_file,
            pairs: file.pairs,
            slot_map,
            topology_hash,
        })
    }

    /// The pair and node index of the node named `name`.
    pub fn node(&self, name: &str) -> Option<(usize, usize)> {
        self.pairs.iter().enumerate().find_map(|(p, pair)| {
            pair.nodes
                .iter()
                .position(|n| n.name == name)
                .map(|n| (p, n))
        })
    }

    pub fn instance(&self) -> Cluster {
        Cluster {
            pairs: self.pairs.clone(),
            slot_map: self.slot_map.clone().into(),
            topology_hash: self.topology_hash,
        }
    }
}

impl Cluster {
    pub fn pair_of(&self, user: &str) -> u16 {
        self.slot_map[net::slot_of(user) as usize]
    }
}

/// `"A-B"` or `"N"`, within 0..16384.
fn parse_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let n = s.trim().parse().ok()?;
            (n, n)
        }
    };
    (a <= b && b < net::SLOT_COUNT).then_some((a, b))
}

/// FNV-1a 64 over a canonical rendering of the pairs, their nodes and the
/// slot map: stable across versions and machines (not Rust's hasher).
fn topology_hash(pairs: &[PairSpec], slot_map: &[u16]) -> u64 {
    let mut text = String::new();
    for pair in pairs {
        text.push_str(&format!("pair {}\n", pair.name));
        for n in &pair.nodes {
            text.push_str(&format!(
                "node {} client {} link {} replication {} admin {}\n",
                n.name, n.client, n.link, n.replication, n.admin
            ));
        }
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = text
        .bytes()
        .chain(slot_map.iter().flat_map(|p| p.to_le_bytes()));
    for byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// What a core node's peer said at startup (engine::link probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Primary { epoch: u64 },
    NotPrimary,
    Unreachable,
}

/// Whether a core node starts as a replica, and of which replication address.
/// A running primary peer wins (this node rejoins as its replica: a node
/// restarted after a failover never comes back as a second primary);
/// otherwise the file's first node is the primary.
pub fn replica_of(spec: &ClusterSpec, pair: usize, node: usize, peer: PeerRole) -> Option<String> {
    let nodes = &spec.pairs[pair].nodes;
    if nodes.len() < 2 {
        return None;
    }
    let other = &nodes[1 - node];
    match peer {
        PeerRole::Primary { .. } => Some(other.replication.to_string()),
        PeerRole::NotPrimary => None,
        PeerRole::Unreachable if node == 0 => None,
        PeerRole::Unreachable => Some(other.replication.to_string()),
    }
}

/// A cluster file for `pairs` pairs of two nodes on loopback, four ports
/// per node from `ports`, the slots split evenly.
pub fn render_local(pairs: usize, ports: &mut impl FnMut() -> u16) -> String {
    let mut out = String::from(
        "# Written by `iris dev-cluster`: every field is described in docs/CLUSTER.md.\n",
    );
    let count = net::SLOT_COUNT as usize;
    for p in 0..pairs {
        let (a, b) = (p * count / pairs, (p + 1) * count / pairs - 1);
        out.push_str(&format!(
            "\n[[pairs]]\nname = \"p{p}\"\nslots = [\"{a}-{b}\"]\n"
        ));
        for n in ["a", "b"] {
            out.push_str(&format!(
                "\n[[pairs.nodes]]\nname = \"p{p}{n}\"\nclient = \"127.0.0.1:{}\"\nlink = \"127.0.0.1:{}\"\nreplication = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{}\"\n",
                ports(), ports(), ports(), ports()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_pairs() -> String {
        let mut port = 20000;
        render_local(2, &mut || {
            port += 1;
            port
        })
    }

    #[test]
    fn rendered_file_parses_and_splits_the_slots() {
        let spec = ClusterSpec::parse(&two_pairs()).unwrap();
        assert_eq!(spec.pairs.len(), 2);
        assert_eq!(spec.slot_map[0], 0);
        assert_eq!(spec.slot_map[8191], 0);
        assert_eq!(spec.slot_map[8192], 1);
        assert_eq!(spec.slot_map[16383], 1);
        assert_eq!(spec.node("p1b"), Some((1, 1)));
        assert_eq!(
            ClusterSpec::parse(&two_pairs()).unwrap().topology_hash,
            spec.topology_hash
        );
    }

    #[test]
    fn any_topology_change_changes_the_hash() {
        let text = two_pairs();
        let base = ClusterSpec::parse(&text).unwrap().topology_hash;
        let moved = text
            .replace("\"0-8191\"", "\"0-8190\"")
            .replace("\"8192-16383\"", "\"8191-16383\"");
        assert_ne!(ClusterSpec::parse(&moved).unwrap().topology_hash, base);
        let readdressed = text.replace("127.0.0.1:20001", "127.0.0.1:29999");
        assert_ne!(
            ClusterSpec::parse(&readdressed).unwrap().topology_hash,
            base
        );
        // Comments and layout are not topology.
        let commented = format!("# hello\n{text}");
        assert_eq!(ClusterSpec::parse(&commented).unwrap().topology_hash, base);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let text = two_pairs();
        let gap = text.replace("\"0-8191\"", "\"1-8191\"");
        assert!(ClusterSpec::parse(&gap)
            .unwrap_err()
            .contains("slot 0 belongs to no pair"));
        let overlap = text.replace("\"0-8191\"", "\"0-8192\"");
        assert!(ClusterSpec::parse(&overlap)
            .unwrap_err()
            .contains("two pairs"));
        let twice = text.replace("name = \"p1a\"", "name = \"p0a\"");
        assert!(ClusterSpec::parse(&twice)
            .unwrap_err()
            .contains("used twice"));
        let range = text.replace("\"0-8191\"", "\"0-99999\"");
        assert!(ClusterSpec::parse(&range)
            .unwrap_err()
            .contains("bad slot range"));
        let unknown = format!("{text}\nfoo = 1\n");
        assert!(ClusterSpec::parse(&unknown).is_err());
    }

    #[test]
    fn a_running_primary_peer_makes_this_node_its_replica() {
        let spec = ClusterSpec::parse(&two_pairs()).unwrap();
        let b_repl = spec.pairs[0].nodes[1].replication.to_string();
        let a_repl = spec.pairs[0].nodes[0].replication.to_string();
        assert_eq!(
            replica_of(&spec, 0, 0, PeerRole::Primary { epoch: 3 }),
            Some(b_repl)
        );
        assert_eq!(replica_of(&spec, 0, 0, PeerRole::Unreachable), None);
        assert_eq!(replica_of(&spec, 0, 1, PeerRole::Unreachable), Some(a_repl));
        assert_eq!(replica_of(&spec, 0, 1, PeerRole::NotPrimary), None);
    }
}
