//! Starting processes inside a node: its network namespace, its private
//! mount namespace (pinned by the node's namespace holder) and its cgroup,
//! all entered between fork and exec, so the process never runs a single
//! instruction outside the node.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;
use crate::lab::netns;

/// Which mount namespace a process gets.
#[derive(Debug, Clone, Copy)]
pub enum Mounts {
    /// A new private one (the namespace holder, which then sets it up).
    New,
    /// The one the holder with this pid pins.
    Of(i32),
}

/// Open namespace and cgroup files, kept open until the process has
/// started (the child uses their descriptors).
#[derive(Debug)]
pub struct NodeEntry {
    net: File,
    mnt: Option<File>,
    cgroups: Vec<File>,
}

fn open(path: &Path, write: bool) -> Result<File, Error> {
    File::options()
        .read(!write)
        .write(write)
        .open(path)
        .map_err(|e| Error::Io(format!("opening {}", path.display()), e))
}

impl NodeEntry {
    /// Opens the node's network namespace `netns_name`, the mount namespace
    /// to use, and the `cgroup.procs` files the process joins.
    pub fn open(
        netns_name: &str,
        mounts: Mounts,
        cgroup_procs: &[PathBuf],
    ) -> Result<NodeEntry, Error> {
        let net = open(&netns::path(netns_name), false)?;
        let mnt = match mounts {
            Mounts::New => None,
            Mounts::Of(pid) => Some(open(Path::new(&format!("/proc/{pid}/ns/mnt")), false)?),
        };
        let cgroups = cgroup_procs
            .iter()
            .map(|p| open(p, true))
            .collect::<Result<_, _>>()?;
        Ok(NodeEntry { net, mnt, cgroups })
    }

    /// Makes `cmd` enter the node when it starts: join the cgroups, then the
    /// network namespace, then the mount namespace (or a new private one),
    /// then `/` as working directory.
    pub fn apply(&self, cmd: &mut Command) {
        let net: RawFd = self.net.as_raw_fd();
        let mnt: Option<RawFd> = self.mnt.as_ref().map(AsRawFd::as_raw_fd);
        let cgroups: Vec<RawFd> = self.cgroups.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: between fork and exec the closure only makes syscalls
        // (write, setns, unshare, chdir) on descriptors opened above and kept
        // open by `self` until spawn returns; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &cgroups {
                    // "0" moves the writing process.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(net, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                match mnt {
                    Some(fd) => {
                        if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    None => {
                        if libc::unshare(libc::CLONE_NEWNS) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                if libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}
