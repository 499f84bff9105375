//! Files in the run directory (default `/run/canal`) through which the agent
//! tells canal-cni what it needs, so the plugin never talks to the API
//! server (CONTRACTS.md).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// `network.json`: written by the agent once it knows its subnet.
pub const NETWORK_FILE: &str = "network.json";
/// Exists while NetworkPolicy is enforced on the node.
pub const POLICY_ENABLED_FILE: &str = "policy-enabled";
/// One file per endpoint whose policy chains are programmed.
pub const ENDPOINTS_DIR: &str = "endpoints";

/// The content of `network.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkFile {
    /// The pod address range.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Ipv4Net,
    /// This node's pod subnet; pod addresses come from it.
    pub node_subnet: Ipv4Net,
    /// MTU of pod interfaces.
    pub mtu: u32,
    /// This node's name.
    pub node_name: String,
    /// This node's address on the underlay.
    #[serde(rename = "nodeIP", default, skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<Ipv4Addr>,
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
        }
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
