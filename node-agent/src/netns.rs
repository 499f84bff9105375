//! rtnetlink connections, in the caller's network namespace or in another one.
//!
//! A netlink socket belongs to the namespace it was created in. To talk to
//! another namespace, a dedicated thread enters it (`setns` changes only the
//! calling thread), creates the socket there and drives the connection on
//! its own small runtime; the returned [`Handle`] is a channel that works
//! from any runtime. The thread ends when every handle is dropped. No
//! process-wide namespace switch, no `unsafe`.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use rtnetlink::Handle;

/// A netlink connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Entering the namespace failed.
    #[error("entering network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The netlink socket could not be created.
    #[error("creating a netlink socket{}: {source}", in_ns(.path))]
    Socket {
        path: Option<PathBuf>,
        #[source]
        source: std::io::Error,
    },
    /// The connection thread could not be started.
    #[error("starting the netlink thread for {path}: {source}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn in_ns(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// A connection in the caller's namespace; its driver is spawned on the
/// current tokio runtime.
pub fn handle_here() -> Result<Handle, NetnsError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetnsError::Socket { path: None, source })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A connection inside the network namespace at `path` (e.g.
/// `/var/run/netns/x` or `/proc/<pid>/ns/net`).
pub fn handle_in(path: &Path) -> Result<Handle, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let owned = path.to_path_buf();
    std::thread::Builder::new()
        .name("netlink-netns".into())
        .spawn(move || {
            let setup = (|| {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: owned.clone(),
                    source,
                })?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(|source| NetnsError::Socket {
                        path: Some(owned.clone()),
                        source,
                    })?;
                // Entering the runtime registers the socket with its reactor.
                let (connection, handle) = {
                    let _guard = runtime.enter();
                    let (connection, handle, _) =
                        rtnetlink::new_connection().map_err(|source| NetnsError::Socket {
                            path: Some(owned.clone()),
                            source,
                        })?;
                    (connection, handle)
                };
                Ok((runtime, connection, handle))
            })();
            match setup {
                Ok((runtime, connection, handle)) => {
                    if tx.send(Ok(handle)).is_ok() {
                        runtime.block_on(connection);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(|source| NetnsError::Thread {
            path: path.to_path_buf(),
            source,
        })?;
    rx.recv().unwrap_or_else(|_| {
        Err(NetnsError::Thread {
            path: path.to_path_buf(),
            source: std::io::Error::other("the netlink thread ended before it was ready"),
        })
    })
}

/// Runs `f` on a thread inside the network namespace of `file` (an open
/// namespace file) and returns what it returns: for what only works from
/// inside, such as writing a namespace's `/proc/sys/net` (which shows the
/// namespace of the thread that opens it).
pub fn run_in<T: Send>(
    file: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    std::thread::scope(|scope| {
        let joined = std::thread::Builder::new()
            .name("netns-run".into())
            .spawn_scoped(scope, || {
                setns(file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Thread {
                path: path.to_path_buf(),
                source,
            })?
            .join();
        joined.unwrap_or_else(|_| {
            Err(NetnsError::Thread {
                path: path.to_path_buf(),
                source: std::io::Error::other("the namespace thread panicked"),
            })
        })
    })
}
