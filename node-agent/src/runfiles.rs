//! Files in the run directory (default `/run/canal`) through which the agent
//! tells canal-cni what it needs, so the plugin never talks to the API
//! server (CONTRACTS.md).
//!
//! `network.json` (written by the agent): the first version had one family,
//! IPv4: `clusterCIDR`, `nodeSubnet`, `nodeIP`, `mtu`, `nodeName`. It now
//! also carries `families`, one entry per IP family this node has a subnet
//! of, in the cluster's order (`clusterCIDRs`): `{"clusterCIDR",
//! "nodeSubnet", "nodeIP"}`. The top-level fields stay and hold the IPv4
//! family's (else, on an IPv6-only node, the IPv6 one), so a reader of the
//! first version keeps working on IPv4 and fails on IPv6 only: it cannot
//! wire IPv6 pods anyway. A file without `families` is the first version
//! and means its one family.
//!
//! `policy-families` (written by the policy component; the contract for
//! giving pods IPv6 without opening a path past NetworkPolicy, see
//! [`ipv6_for_pods`]): the IP families in which that component guards pods
//! on this node (anti-spoofing, and NetworkPolicy while it is enabled), as
//! `ipv4` or `ipv4,ipv6` (tokens separated by commas or white space).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::overlay::family::Family;

/// `network.json`: written by the agent once it knows its subnet.
pub const NETWORK_FILE: &str = "network.json";
/// Exists while NetworkPolicy is enforced on the node.
pub const POLICY_ENABLED_FILE: &str = "policy-enabled";
/// The families the policy component guards pods in (see the module docs).
pub const POLICY_FAMILIES_FILE: &str = "policy-families";
/// One file per endpoint whose policy chains are programmed.
pub const ENDPOINTS_DIR: &str = "endpoints";

/// One IP family of the node's pod network.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FamilyNetwork {
    /// The family's pod range.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: IpNet,
    /// This node's pod subnet of the family.
    pub node_subnet: IpNet,
    /// This node's underlay address of the family.
    #[serde(rename = "nodeIP", default, skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<IpAddr>,
}

impl FamilyNetwork {
    /// The family.
    pub fn family(&self) -> Family {
        Family::of_net(&self.node_subnet)
    }
}

/// The content of `network.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkFile {
    /// The IPv4 family's pod range (else the IPv6 one): the first version.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: IpNet,
    /// This node's pod subnet of that family.
    pub node_subnet: IpNet,
    /// MTU of pod interfaces (what fits every family's overlay).
    pub mtu: u32,
    /// This node's name.
    pub node_name: String,
    /// This node's address on the underlay, of that family.
    #[serde(rename = "nodeIP", default, skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<IpAddr>,
    /// Every family, in the cluster's order (empty in the first version).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub families: Vec<FamilyNetwork>,
}

impl NetworkFile {
    /// The file for these families (in the cluster's order); None without any.
    pub fn new(node_name: &str, mtu: u32, families: Vec<FamilyNetwork>) -> Option<NetworkFile> {
        let first = families
            .iter()
            .find(|f| f.family() == Family::V4)
            .or(families.first())
            .copied()?;
        Some(NetworkFile {
            cluster_cidr: first.cluster_cidr,
            node_subnet: first.node_subnet,
            mtu,
            node_name: node_name.to_string(),
            node_ip: first.node_ip,
            families,
        })
    }

    /// Every family (a file of the first version: its one).
    pub fn families(&self) -> Vec<FamilyNetwork> {
        if self.families.is_empty() {
            vec![FamilyNetwork {
                cluster_cidr: self.cluster_cidr,
                node_subnet: self.node_subnet,
                node_ip: self.node_ip,
            }]
        } else {
            self.families.clone()
        }
    }

    /// The family's entry, if the node has a subnet of it.
    pub fn family(&self, family: Family) -> Option<FamilyNetwork> {
        self.families().into_iter().find(|f| f.family() == family)
    }
}

/// Whether canal-cni may give a pod IPv6 on this node (and enable IPv6 on
/// its host veth), from `policy-enabled` (exists) and the text of
/// `policy-families` (None: the file does not exist). Fail closed:
///
/// - `policy-families` exists: IPv6 iff it lists `ipv6`. A policy
///   component that knows the contract decides, whatever `policy-enabled`
///   says (it guards pods against spoofing even with policy disabled).
/// - it does not exist (a policy component from before the contract, which
///   guards IPv4 only): IPv6 iff NetworkPolicy is not enforced on the node
///   (`policy-enabled` absent), so no NetworkPolicy can be bypassed over
///   IPv6.
///
/// A file that cannot be parsed gives no IPv6 and says why.
pub fn ipv6_for_pods(policy_enabled: bool, policy_families: Option<&str>) -> Result<bool, String> {
    let Some(text) = policy_families else {
        return Ok(!policy_enabled);
    };
    let mut families = BTreeSet::new();
    for token in text.split(|c: char| c == ',' || c.is_whitespace()) {
        match token {
            "" => {}
            "ipv4" => {
                families.insert(Family::V4);
            }
            "ipv6" => {
                families.insert(Family::V6);
            }
            other => {
                return Err(format!(
                    "{POLICY_FAMILIES_FILE} lists {other:?}; only ipv4 and ipv6 are known"
                ));
            }
        }
    }
    Ok(families.contains(&Family::V6))
}

/// A run-dir file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RunFileError {
    /// I/O failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path} is not a valid canal network file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Paths inside a run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The directory.
    pub dir: PathBuf,
}

impl RunDir {
    /// Wraps a directory.
    pub fn new(dir: impl Into<PathBuf>) -> RunDir {
        RunDir { dir: dir.into() }
    }

    /// `network.json`.
    pub fn network_file(&self) -> PathBuf {
        self.dir.join(NETWORK_FILE)
    }

    /// `policy-enabled`.
    pub fn policy_enabled_file(&self) -> PathBuf {
        self.dir.join(POLICY_ENABLED_FILE)
    }

    /// `policy-families`.
    pub fn policy_families_file(&self) -> PathBuf {
        self.dir.join(POLICY_FAMILIES_FILE)
    }

    /// [`ipv6_for_pods`] from the files as they are now. An unreadable
    /// `policy-families` (other than missing) gives no IPv6.
    pub fn ipv6_for_pods(&self) -> Result<bool, String> {
        let path = self.policy_families_file();
        let families = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        ipv6_for_pods(self.policy_enabled_file().exists(), families.as_deref())
    }

    /// `endpoints/<interface>`.
    pub fn endpoint_file(&self, interface: &str) -> PathBuf {
        self.dir.join(ENDPOINTS_DIR).join(interface)
    }

    /// Reads `network.json`; Ok(None) when it does not exist yet.
    pub fn read_network(&self) -> Result<Option<NetworkFile>, RunFileError> {
        let path = self.network_file();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RunFileError::Io {
                    action: "reading",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| RunFileError::Parse { path, source })
    }

    /// Writes `network.json` atomically, only when its content changes.
    /// Returns whether it was written.
    pub fn write_network(&self, file: &NetworkFile) -> Result<bool, RunFileError> {
        if self.read_network().ok().flatten().as_ref() == Some(file) {
            return Ok(false);
        }
        let mut text = serde_json::to_vec_pretty(file).map_err(|source| RunFileError::Parse {
            path: self.network_file(),
            source,
        })?;
        text.push(b'\n');
        write_atomic(&self.network_file(), &text, 0o644)?;
        Ok(true)
    }
}

/// Writes `content` to a temporary file next to `path`, syncs it and renames
/// it over `path`, so readers see the old or the new file, never a part.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<(), RunFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |action, source| RunFileError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io("writing", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> NetworkFile {
        NetworkFile {
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            node_subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1450,
            node_name: "node-1".into(),
            node_ip: Some("192.168.1.1".parse().unwrap()),
            families: Vec::new(),
        }
    }

    fn fam(cluster: &str, subnet: &str, ip: &str) -> FamilyNetwork {
        FamilyNetwork {
            cluster_cidr: cluster.parse().unwrap(),
            node_subnet: subnet.parse().unwrap(),
            node_ip: Some(ip.parse().unwrap()),
        }
    }

    #[test]
    fn dual_stack_file_keeps_the_first_version_readable() {
        let v6 = fam("fd00:10:244::/56", "fd00:10:244:1::/64", "fd00:30::11");
        let v4 = fam("10.244.0.0/16", "10.244.1.0/24", "192.168.1.1");
        // An IPv6-primary cluster: the list keeps its order, the top-level
        // fields are the IPv4 family's.
        let f = NetworkFile::new("node-1", 1430, vec![v6, v4]).unwrap();
        let json: serde_json::Value = serde_json::to_value(&f).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "clusterCIDR": "10.244.0.0/16",
                "nodeSubnet": "10.244.1.0/24",
                "mtu": 1430,
                "nodeName": "node-1",
                "nodeIP": "192.168.1.1",
                "families": [
                    {"clusterCIDR": "fd00:10:244::/56", "nodeSubnet": "fd00:10:244:1::/64", "nodeIP": "fd00:30::11"},
                    {"clusterCIDR": "10.244.0.0/16", "nodeSubnet": "10.244.1.0/24", "nodeIP": "192.168.1.1"},
                ],
            })
        );
        // A reader of the first version sees an IPv4 file.
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        #[allow(dead_code)]
        struct V1 {
            #[serde(rename = "clusterCIDR")]
            cluster_cidr: ipnet::Ipv4Net,
            node_subnet: ipnet::Ipv4Net,
            mtu: u32,
            node_name: String,
        }
        let v1: V1 = serde_json::from_value(json).unwrap();
        assert_eq!(v1.node_subnet.to_string(), "10.244.1.0/24");
        assert_eq!(f.family(Family::V6), Some(v6));
        // IPv6 only: the top-level fields are IPv6 (a first-version reader
        // refuses the file, it could not wire IPv6 pods).
        let only = NetworkFile::new("node-1", 1430, vec![v6]).unwrap();
        assert_eq!(only.node_subnet, v6.node_subnet);
        assert!(serde_json::from_value::<V1>(serde_json::to_value(&only).unwrap()).is_err());
        assert_eq!(NetworkFile::new("node-1", 1430, vec![]), None);
        // A first-version file is one IPv4 family.
        assert_eq!(file().families(), vec![v4]);
        assert_eq!(file().family(Family::V6), None);
    }

    #[test]
    fn ipv6_for_pods_fails_closed() {
        // No contract file (today's policy component): IPv6 only where no
        // NetworkPolicy is enforced.
        assert_eq!(ipv6_for_pods(false, None), Ok(true));
        assert_eq!(ipv6_for_pods(true, None), Ok(false));
        // The policy component says what it guards.
        assert_eq!(ipv6_for_pods(true, Some("ipv4,ipv6\n")), Ok(true));
        assert_eq!(ipv6_for_pods(true, Some("ipv4 ipv6")), Ok(true));
        assert_eq!(ipv6_for_pods(true, Some("ipv4\n")), Ok(false));
        // Even with policy disabled (it still guards against spoofing).
        assert_eq!(ipv6_for_pods(false, Some("ipv4")), Ok(false));
        assert_eq!(ipv6_for_pods(false, Some("")), Ok(false));
        assert!(ipv6_for_pods(false, Some("ipv4,IPv6")).is_err());
        assert!(ipv6_for_pods(false, Some("all")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        assert_eq!(run.ipv6_for_pods(), Ok(true));
        std::fs::write(run.policy_enabled_file(), "enabled\n").unwrap();
        assert_eq!(run.ipv6_for_pods(), Ok(false));
        std::fs::write(run.policy_families_file(), "ipv4,ipv6\n").unwrap();
        assert_eq!(run.ipv6_for_pods(), Ok(true));
        std::fs::remove_file(run.policy_families_file()).unwrap();
        std::fs::create_dir(run.policy_families_file()).unwrap();
        assert!(run.ipv6_for_pods().is_err(), "unreadable: no IPv6");
    }

    #[test]
    fn network_file_format_is_the_contract() {
        let json: serde_json::Value = serde_json::to_value(file()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "clusterCIDR": "10.244.0.0/16",
                "nodeSubnet": "10.244.1.0/24",
                "mtu": 1450,
                "nodeName": "node-1",
                "nodeIP": "192.168.1.1",
            })
        );
        // The minimal form of CONTRACTS.md parses too.
        let min: NetworkFile = serde_json::from_str(
            r#"{"clusterCIDR":"10.244.0.0/16","nodeSubnet":"10.244.1.0/24","mtu":1450,"nodeName":"n"}"#,
        )
        .unwrap();
        assert_eq!(min.node_ip, None);
    }

    #[test]
    fn writes_atomically_and_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path().join("run"));
        assert_eq!(run.read_network().unwrap(), None);
        assert!(run.write_network(&file()).unwrap());
        assert!(!run.write_network(&file()).unwrap());
        assert_eq!(run.read_network().unwrap(), Some(file()));
        let mut f = file();
        f.mtu = 1400;
        assert!(run.write_network(&f).unwrap());
        assert_eq!(run.read_network().unwrap().unwrap().mtu, 1400);
        let leftovers: Vec<_> = std::fs::read_dir(&run.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("network.json")]);
        std::fs::write(run.network_file(), "{").unwrap();
        assert!(matches!(
            run.read_network(),
            Err(RunFileError::Parse { .. })
        ));
    }
}
