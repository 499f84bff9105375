//! Per-attachment serialisation: an exclusive `flock` on a file per
//! container ID and one per host interface, held across the IPAM change
//! and the kernel work of one ADD, DEL, CHECK or GC step, so that calls
//! for one container (and for the sandboxes of one pod, which share the
//! host veth's name) run one after the other and the store and the kernel
//! agree after each. Lock files are removed when the attachment is gone;
//! a waiter that wakes on a removed file notices (its inode is no longer
//! the path's) and locks the path again.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::ipam::StoreError;

/// A held lock file.
pub struct FileLock {
    lock: Flock<File>,
    path: PathBuf,
}

fn err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl FileLock {
    /// Locks `path` (created if missing), waiting for the holder unless
    /// `wait` is false (then None when it is held).
    pub fn acquire(path: &Path, wait: bool) -> Result<Option<FileLock>, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err("creating", dir))?;
        }
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(err("opening", path))?;
            let arg = if wait {
                FlockArg::LockExclusive
            } else {
                FlockArg::LockExclusiveNonblock
            };
            let lock = match Flock::lock(file, arg) {
                Ok(lock) => lock,
                Err((_, Errno::EWOULDBLOCK)) if !wait => return Ok(None),
                Err((_, errno)) => return Err(err("locking", path)(std::io::Error::from(errno))),
            };
            // The previous holder may have removed the file (and another
            // process made a new one) while this one waited.
            let held = lock.metadata().map_err(err("inspecting", path))?;
            match std::fs::metadata(path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Some(FileLock {
                        lock,
                        path: path.to_path_buf(),
                    }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err("inspecting", path)(e)),
            }
        }
    }

    /// Removes the lock file, then releases the lock.
    pub fn remove(self) {
        // Best effort: a file left behind is only an empty file.
        let _ = std::fs::remove_file(&self.path);
        drop(self.lock);
    }
}

/// The locks of one attachment: its container's, then its host
/// interface's (always taken in that order, so two calls never wait on
/// each other in a cycle; the IPAM store's own lock comes last and is
/// held only briefly).
pub struct AttachmentLock {
    container: FileLock,
    interface: Option<FileLock>,
}

impl AttachmentLock {
    /// Takes both locks under `dir` (only the container's without a host
    /// interface); None when `wait` is false and either is held.
    pub fn acquire(
        dir: &Path,
        container_id: &str,
        host_if: Option<&str>,
        wait: bool,
    ) -> Result<Option<AttachmentLock>, StoreError> {
        // Both names are validated (container IDs by the spec's pattern,
        // interface names by the kernel's rules): no '/' and no "..".
        let Some(container) =
            FileLock::acquire(&dir.join(format!("container-{container_id}")), wait)?
        else {
            return Ok(None);
        };
        let interface = match host_if {
            Some(name) => match FileLock::acquire(&dir.join(format!("interface-{name}")), wait)? {
                Some(lock) => Some(lock),
                None => return Ok(None),
            },
            None => None,
        };
        Ok(Some(AttachmentLock {
            container,
            interface,
        }))
    }

    /// The attachment is gone: remove both files, then release.
    pub fn remove(self) {
        if let Some(interface) = self.interface {
            interface.remove();
        }
        self.container.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn second_holder_waits_or_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/container-c1");
        let first = FileLock::acquire(&path, true).unwrap().unwrap();
        assert!(FileLock::acquire(&path, false).unwrap().is_none());
        drop(first);
        assert!(FileLock::acquire(&path, false).unwrap().is_some());
    }

    #[test]
    fn removing_the_file_never_lets_two_hold_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("container-c1"));
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (path, inside) = (path.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let lock = FileLock::acquire(&path, true).unwrap().unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        lock.remove();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!path.exists());
    }
}
