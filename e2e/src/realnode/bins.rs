//! The binaries of the real-kubelet lab: the Kubernetes components built by
//! `e2e/go/build.sh` (groups `control-plane` and `node`, plus `e2e` for the
//! upstream suites' e2e.test), containerd unpacked from Debian's package by the same
//! script, and runc from Debian.
//!
//! Each lab links them into its own `bin/` directory, so `down` finds every
//! process the lab started, even after a crash and without pid files, by
//! the path of its executable.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;
use crate::binaries::{self, build_script, cache_base};
use crate::helm::HELM_VERSION;

/// The Kubernetes components every real-kubelet lab runs.
pub const NODE_COMPONENTS: [&str; 10] = [
    "kube-apiserver",
    "etcd",
    "kubectl",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "pause",
    "agnhost",
    "helm",
];
/// containerd's binaries (from Debian's package).
pub const CONTAINERD_BINARIES: [&str; 3] = ["containerd", "containerd-shim-runc-v2", "ctr"];
/// What `canal-lab e2e` adds.
pub const E2E_COMPONENTS: [&str; 1] = ["e2e.test"];
/// runc, from Debian (`apt-get install runc`).
pub const RUNC: &str = "/usr/sbin/runc";

/// Where a component is cached.
fn cached(name: &str) -> PathBuf {
    if name == "helm" {
        cache_base()
            .join(format!("helm-{HELM_VERSION}"))
            .join("helm")
    } else {
        binaries::cache_dir().join(name)
    }
}

/// The cached containerd, `<cache>/containerd-<debian version>/usr/bin`
/// (the newest when several versions are cached).
fn containerd_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache_base())
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("containerd-"))
                && CONTAINERD_BINARIES
                    .iter()
                    .all(|b| p.join("usr/bin").join(b).is_file())
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|d| d.join("usr/bin"))
}

fn missing(with_e2e: bool) -> Vec<String> {
    let mut out: Vec<String> = NODE_COMPONENTS
        .iter()
        .chain(if with_e2e { &E2E_COMPONENTS[..] } else { &[] })
        .filter(|n| !cached(n).is_file())
        .map(|n| n.to_string())
        .collect();
    if containerd_dir().is_none() {
        out.push("containerd".into());
    }
    out
}

/// Builds (once per version) whatever is missing: `build.sh control-plane
/// node [e2e]`. `CANAL_NO_BUILD=1` makes a missing binary an error.
pub fn ensure(with_e2e: bool) -> Result<(), Error> {
    if !Path::new(RUNC).is_file() {
        return Err(Error::Lab(format!(
            "{RUNC} not found: the real-kubelet lab needs Debian's runc (apt-get install runc)"
        )));
    }
    let gone = missing(with_e2e);
    if gone.is_empty() {
        return Ok(());
    }
    if std::env::var_os("CANAL_NO_BUILD").is_some() {
        return Err(Error::MissingBinaries {
            dir: binaries::cache_dir(),
            hint: format!(
                "{} missing; run bash {} control-plane node{}",
                gone.join(", "),
                build_script().display(),
                if with_e2e { " e2e" } else { "" }
            ),
        });
    }
    eprintln!(
        "canal: building {} (once per version; kubelet and co. take minutes, e2e.test longer)",
        gone.join(", ")
    );
    let mut cmd = Command::new("bash");
    cmd.arg(build_script()).args(["control-plane", "node"]);
    if with_e2e {
        cmd.arg("e2e");
    }
    let status = cmd
        .status()
        .map_err(|e| Error::Io(format!("running {}", build_script().display()), e))?;
    let gone = missing(with_e2e);
    if !status.success() || !gone.is_empty() {
        return Err(Error::MissingBinaries {
            dir: binaries::cache_dir(),
            hint: format!(
                "{} failed ({status}); missing: {}",
                build_script().display(),
                gone.join(", ")
            ),
        });
    }
    Ok(())
}

/// The path of a cached component or containerd binary.
pub fn source(name: &str) -> Result<PathBuf, Error> {
    if CONTAINERD_BINARIES.contains(&name) {
        return containerd_dir()
            .map(|d| d.join(name))
            .ok_or_else(|| Error::Lab("containerd is not unpacked yet (build.sh node)".into()));
    }
    Ok(cached(name))
}

/// Links (or copies, across file systems) every binary into `bin_dir`.
pub fn link_all(bin_dir: &Path, with_e2e: bool) -> Result<(), Error> {
    std::fs::create_dir_all(bin_dir)
        .map_err(|e| Error::Io(format!("creating {}", bin_dir.display()), e))?;
    let names = NODE_COMPONENTS
        .iter()
        .chain(CONTAINERD_BINARIES.iter())
        .chain(if with_e2e { &E2E_COMPONENTS[..] } else { &[] });
    for name in names {
        link(&source(name)?, &bin_dir.join(name))?;
    }
    Ok(())
}

/// Hard-links `from` to `to` (copying when they are on different file
/// systems); an existing `to` is replaced.
pub fn link(from: &Path, to: &Path) -> Result<(), Error> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)
            .map_err(|e| Error::Io(format!("copying {} to {}", from.display(), to.display()), e))?;
    }
    Ok(())
}
