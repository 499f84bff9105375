//! Opening CNI_NETNS. The path is opened once and that open file is what
//! the netlink connection enters (through `/proc/self/fd/N`), so the
//! namespace that was checked is the namespace that is changed. A path to
//! the plugin's own namespace (the node's: by its netns path, a bind mount,
//! `/proc/<pid>/ns/net` or `/proc/self/ns/net`) is refused: wiring a pod
//! there would replace the node's routes and a DEL would delete the node's
//! interfaces. Identity is the namespace file's (device, inode), the same
//! for every path to one namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;

/// CNI_NETNS cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The path does not exist (the sandbox is gone).
    #[error("network namespace {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The path is the plugin's (the node's) own namespace.
    #[error("{} is the node's own network namespace, not a container's", .0.display())]
    NodeNamespace(PathBuf),
    /// The path is not a network namespace.
    #[error("{} is not a network namespace", .0.display())]
    NotNetns(PathBuf),
    /// Another failure.
    #[error("opening network namespace {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The netlink connection could not be set up.
    #[error(transparent)]
    Netlink(#[from] crate::netns::NetnsError),
}

/// (device, inode) of a namespace file.
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// The container's namespace: a netlink handle inside it, and the open
/// namespace file that was checked (so what runs inside later is in that
/// same namespace, whatever the path names by then).
pub struct Sandbox {
    /// netlink inside the namespace.
    pub handle: Handle,
    file: File,
    path: PathBuf,
}

impl Sandbox {
    /// Writes `value` to `/proc/sys/<key>` inside the namespace (e.g.
    /// `net/ipv6/conf/eth0/accept_dad`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), SandboxError> {
        let path = format!("/proc/sys/{key}");
        crate::netns::run_in(&self.file, &self.path, || std::fs::write(&path, value))?.map_err(
            |source| SandboxError::Io {
                path: PathBuf::from(format!("{} (inside {})", path, self.path.display())),
                source,
            },
        )
    }

    /// Reads `/proc/sys/<key>` inside the namespace (trimmed).
    pub fn read_sysctl(&self, key: &str) -> Result<String, SandboxError> {
        let path = format!("/proc/sys/{key}");
        crate::netns::run_in(&self.file, &self.path, || std::fs::read_to_string(&path))?
            .map(|s| s.trim().to_string())
            .map_err(|source| SandboxError::Io {
                path: PathBuf::from(format!("{} (inside {})", path, self.path.display())),
                source,
            })
    }
}

/// The container's namespace at `path`, checked.
pub fn open(path: &Path) -> Result<Sandbox, SandboxError> {
    let io = |source: std::io::Error| SandboxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SandboxError::Missing(path.to_path_buf()),
        _ => io(e),
    })?;
    let theirs = file.metadata().map_err(io)?;
    let ours = std::fs::metadata("/proc/self/ns/net").map_err(io)?;
    if identity(&theirs) == identity(&ours) {
        return Err(SandboxError::NodeNamespace(path.to_path_buf()));
    }
    if !theirs.is_file() {
        // Namespace files are regular files of nsfs; directories, devices
        // and sockets never are.
        return Err(SandboxError::NotNetns(path.to_path_buf()));
    }
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let handle = crate::netns::handle_in(&via_fd).map_err(|e| match e {
        // setns(2) refuses what is not a network namespace with EINVAL.
        crate::netns::NetnsError::Enter {
            source: nix::errno::Errno::EINVAL,
            ..
        } => SandboxError::NotNetns(path.to_path_buf()),
        other => SandboxError::Netlink(other),
    })?;
    Ok(Sandbox {
        handle,
        file,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugins_own_namespace_and_non_namespaces_are_refused() {
        // Needs no privileges: these are refused before setns(2).
        assert!(matches!(
            open(Path::new("/proc/self/ns/net")),
            Err(SandboxError::NodeNamespace(_))
        ));
        let pid_path = format!("/proc/{}/ns/net", std::process::id());
        assert!(matches!(
            open(Path::new(&pid_path)),
            Err(SandboxError::NodeNamespace(_))
        ));
        assert!(matches!(
            open(Path::new("/nonexistent/netns")),
            Err(SandboxError::Missing(_))
        ));
        assert!(matches!(
            open(Path::new("/proc")),
            Err(SandboxError::NotNetns(_))
        ));
    }
}
