//! The image cache outside the repository (`<canal cache>/images`, next to
//! the Go binaries of [`crate::binaries`]) and the lock that makes
//! concurrent builders (two worktrees, two test binaries) wait for one
//! another instead of bootstrapping the same base twice.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::Error;

/// `<canal cache>/images` (`~/.cache/canal/images` by default).
pub fn dir() -> PathBuf {
    crate::binaries::cache_base().join("images")
}

/// An exclusive lock on a file, released when dropped (or when the process
/// dies: flock locks go with the file descriptor).
pub struct Lock {
    _lock: Flock<File>,
}

impl Lock {
    /// Waits for the exclusive lock on `<dir>/.lock`, telling the user when
    /// someone else holds it.
    pub fn exclusive(dir: &Path) -> Result<Lock, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join(".lock");
        let open = || {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))
        };
        let lock_err =
            |e: nix::errno::Errno| Error::io(format!("locking {}", path.display()), e.into());
        match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Lock { _lock: lock }),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                eprintln!(
                    "canal: waiting for another image build ({} is locked)",
                    path.display()
                );
                Flock::lock(file, FlockArg::LockExclusive)
                    .map(|lock| Lock { _lock: lock })
                    .map_err(|(_, e)| lock_err(e))
            }
            Err((_, e)) => Err(lock_err(e)),
        }
    }
}
