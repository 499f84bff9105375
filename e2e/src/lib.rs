//! canal's local lab and the support its integration and end-to-end tests
//! share: a real etcd + kube-apiserver (built from Go modules, cached per
//! version), installation of the CRDs, and the multi-node network lab.

pub mod binaries;
pub mod certs;
pub mod control_plane;
pub mod helm;
pub mod install;
pub mod lab;
pub mod process;

use std::path::PathBuf;

pub use control_plane::ControlPlane;

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
}

impl Error {
    /// A failure that a retry with new ports may fix.
    pub fn is_startup_failure(&self) -> bool {
        matches!(self, Error::Exited { .. } | Error::Timeout(_))
    }
}
