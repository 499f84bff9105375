//! The real Kubernetes control-plane binaries the tests and the lab run:
//! kube-apiserver, etcd and kubectl, built from Go modules by
//! `e2e/go/build.sh` and cached per version outside the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// The Kubernetes release the binaries are built from; matches the
/// k8s-openapi feature (`v1_37`) the Rust crates use.
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// Paths of the control-plane binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
    /// kubectl of the same release.
    pub kubectl: PathBuf,
}

/// Where build.sh caches tools: `$CANAL_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/canal`, else `~/.cache/canal`.
pub fn cache_base() -> PathBuf {
    std::env::var_os("CANAL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("canal")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/canal")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/canal"))
}

/// The cache directory of the control-plane binaries: `<cache>/k8s-<version>`.
pub fn cache_dir() -> PathBuf {
    cache_base().join(format!("k8s-{KUBERNETES_VERSION}"))
}

/// The build script in the source tree.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("go/build.sh")
}

impl Binaries {
    fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            kube_apiserver: dir.join("kube-apiserver"),
            etcd: dir.join("etcd"),
            kubectl: dir.join("kubectl"),
        }
    }

    fn all_present(&self) -> bool {
        [&self.kube_apiserver, &self.etcd, &self.kubectl]
            .iter()
            .all(|p| p.is_file())
    }

    /// Finds the cached binaries, building them first when they are missing
    /// (a cold build takes several minutes; `CANAL_NO_BUILD=1` turns that
    /// into an error instead).
    pub fn ensure() -> Result<Binaries, Error> {
        let dir = cache_dir();
        let bins = Binaries::in_dir(&dir);
        if bins.all_present() {
            return Ok(bins);
        }
        if std::env::var_os("CANAL_NO_BUILD").is_some() {
            return Err(Error::MissingBinaries {
                dir,
                hint: format!("run {}", build_script().display()),
            });
        }
        eprintln!(
            "canal: building kube-apiserver, etcd and kubectl {KUBERNETES_VERSION} into {} (once per version)",
            dir.display()
        );
        let status = Command::new("bash")
            .arg(build_script())
            .env("CANAL_K8S_BIN_DIR", &dir)
            .status()
            .map_err(|e| Error::Io(format!("running {}", build_script().display()), e))?;
        if !status.success() || !bins.all_present() {
            return Err(Error::MissingBinaries {
                dir,
                hint: format!("{} failed ({status})", build_script().display()),
            });
        }
        Ok(bins)
    }
}
