//! canal's local lab and the support its integration and end-to-end tests
//! share: a real etcd + kube-apiserver (built from Go modules, cached per
//! version), installation of the CRDs, the multi-node network lab
//! ([`lab`], driven by the `canal-lab` binary and by [`lab::Lab`] in tests),
//! and container images built without a registry or engine ([`images`]).

pub mod bench;
pub mod binaries;
pub mod certs;
pub mod control_plane;
pub mod helm;
pub mod images;
pub mod install;
pub mod lab;
pub mod policy_model;
pub mod ports;
pub mod process;
pub mod realnode;

use std::path::PathBuf;

pub use control_plane::ControlPlane;
pub use lab::Lab;

/// Everything that can go wrong while running the lab or a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Certificates(String),
    /// The control-plane binaries are missing and could not be built.
    #[error("kube-apiserver/etcd/kubectl missing in {dir}: {hint}")]
    MissingBinaries { dir: PathBuf, hint: String },
    /// A process exited while we waited for it.
    #[error("{name} exited ({status}); last log lines:\n{log_tail}")]
    Exited {
        name: String,
        status: String,
        log_tail: String,
    },
    /// Something did not become ready in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// A kubeconfig could not be loaded.
    #[error("loading kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, String),
    /// An API request failed.
    #[error("{0}: {1}")]
    Kube(String, #[source] kube::Error),
    /// Something about the lab's state is wrong.
    #[error("{0}")]
    Lab(String),
    /// An external command (ip, bridge, canal-cni install) failed.
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    /// Entering a network namespace failed.
    #[error("entering network namespace {netns}: {source}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    /// The lab failed or is not ready: the cause, then for each component
    /// that is not ready or not running its log's path and last error lines.
    #[error("{cause}\n{report}")]
    LabFailed { cause: Box<Error>, report: String },
    /// What cannot work on this machine, one line per cause with its fix
    /// (`canal-lab up`'s preflight).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Preflight(Vec<lab::preflight::Failure>),
    /// A CNI plugin returned an error (the CNI error format).
    #[error("{0}")]
    Cni(Box<CniFailure>),
    /// Building or reading a container image failed.
    #[error(transparent)]
    Image(#[from] images::Error),
}

/// A CNI plugin's failure: which plugin, for which pod, and its CNI error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CNI {command} of {pod}: plugin {plugin} failed with code {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniFailure {
    /// `namespace/name`.
    pub pod: String,
    /// The plugin's type.
    pub plugin: String,
    /// ADD, DEL or CHECK.
    pub command: String,
    /// The CNI error code (0 when the plugin gave none).
    pub code: u64,
    /// The error message.
    pub msg: String,
    /// Details.
    pub details: String,
}

impl Error {
    /// A failure that a retry with new ports may fix.
    pub fn is_startup_failure(&self) -> bool {
        matches!(self, Error::Exited { .. } | Error::Timeout(_))
    }
}
