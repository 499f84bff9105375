//! The lab: one machine, real parts. `up` starts a control plane (and, as the
//! lab grows, node network namespaces, the controller and the agents);
//! `down` removes everything `up` made, also after a crash.

use std::path::{Path, PathBuf};

use canal_crds::CanalNetworkSpec;
use serde::{Deserialize, Serialize};

use crate::binaries::Binaries;
use crate::control_plane::{self, Layout};
use crate::{Error, install};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/tmp/canal-lab";
/// The pod network the lab's CanalNetwork uses.
pub const LAB_CLUSTER_CIDR: &str = "10.244.0.0/16";

/// What `up` recorded, for later commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// API server URL.
    pub server: String,
    /// Unix time `up` finished.
    pub started_at: u64,
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

impl StateDir {
    /// Wraps a directory path.
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }
    /// The kubeconfig users and tests use.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// The control plane's own directory.
    pub fn control_plane(&self) -> PathBuf {
        self.dir.join("control-plane")
    }
    /// The recorded state.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("lab.json")
    }

    /// Reads the recorded state.
    pub fn load(&self) -> Result<LabState, Error> {
        let path = self.state_file();
        let text = std::fs::read_to_string(&path).map_err(|_| {
            Error::Lab(format!(
                "no lab at {} (run `canal-lab up` first)",
                self.dir.display()
            ))
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Lab(format!("reading {}: {e}", path.display())))
    }
}

/// Options of `up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of nodes.
    pub nodes: u32,
}

/// Brings the lab up; cleans up what it made when any step fails.
pub async fn up(state: &StateDir, opts: &UpOptions) -> Result<LabState, Error> {
    if state.state_file().exists() {
        return Err(Error::Lab(format!(
            "a lab is already up in {} (run `canal-lab down --state-dir {}` first)",
            state.dir.display(),
            state.dir.display()
        )));
    }
    // Leftovers of a crashed lab (no state file but processes or files).
    down(state);
    std::fs::create_dir_all(&state.dir)
        .map_err(|e| Error::Io(format!("creating {}", state.dir.display()), e))?;
    match up_inner(state, opts).await {
        Ok(s) => Ok(s),
        Err(e) => {
            down(state);
            Err(e)
        }
    }
}

async fn up_inner(state: &StateDir, _opts: &UpOptions) -> Result<LabState, Error> {
    let (cp, client) = control_plane::start_detached(&state.control_plane()).await?;
    std::fs::copy(cp.layout.kubeconfig(), state.kubeconfig())
        .map_err(|e| Error::Io(format!("writing {}", state.kubeconfig().display()), e))?;
    install::install_crds(&client).await?;
    install::apply_default_network(
        &client,
        CanalNetworkSpec::with_cluster_cidr(LAB_CLUSTER_CIDR),
    )
    .await?;
    let lab = LabState {
        server: cp.server.clone(),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    };
    let text = serde_json::to_string_pretty(&lab)
        .map_err(|e| Error::Lab(format!("encoding lab state: {e}")))?;
    std::fs::write(state.state_file(), text)
        .map_err(|e| Error::Io(format!("writing {}", state.state_file().display()), e))?;
    Ok(lab)
}

/// Stops every process and removes every file `up` made. Safe to run twice
/// and after a crash. Returns what it stopped.
pub fn down(state: &StateDir) -> Vec<String> {
    let stopped = control_plane::stop_detached(&state.control_plane());
    remove_dir(&state.dir);
    stopped
}

fn remove_dir(dir: &Path) {
    if dir.exists() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Whether the lab's API server process is alive.
pub fn control_plane_running(state: &StateDir) -> bool {
    let layout = Layout {
        dir: state.control_plane(),
    };
    crate::process::live_pid(&layout.pid_file("kube-apiserver"), "kube-apiserver").is_some()
}

/// `kubectl` with the lab's kubeconfig.
pub fn kubectl(state: &StateDir) -> Result<std::process::Command, Error> {
    let bins = Binaries::ensure()?;
    let mut cmd = std::process::Command::new(bins.kubectl);
    cmd.env("KUBECONFIG", state.kubeconfig());
    Ok(cmd)
}
