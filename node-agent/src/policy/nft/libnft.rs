//! Runs nftables scripts through libnftables in the agent's own process
//! (`nft_run_cmd_from_buffer`: one buffer is one atomic transaction), or,
//! where the library is missing, through `nft -f -` in one process per
//! script.
//!
//! Why in-process (measured, README "nftables dataplane"): on a table of
//! 20,000 rules and 100,000 set members, `nft -f -` spends most of its time
//! starting and filling its cache (a set element add: p50 4.4 ms, p99 89 ms;
//! a chain replace: p50 26 ms, p99 63 ms on the loaded 2-core machine),
//! while the library keeps its cache between transactions (0.02 ms and
//! 0.8 ms). The library is loaded with `dlopen` at run time, so canal-agent
//! neither links nor needs it where nftables is not used.
//!
//! A context lives on a dedicated thread (it is not thread-safe, and its
//! netlink socket must be opened inside the target network namespace).
//! Its commits are the agent's own: the thread's id and its sockets' port
//! ids are registered with [`own_writers`](crate::policy::watch::own_writers)
//! before the first script runs, so the firewall watch does not take them
//! for drift.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::policy::exec::{Exec, ExecError};
use crate::policy::watch::own_writers;

/// `NFT_CTX_OUTPUT_JSON`.
const OUTPUT_JSON: c_uint = 1 << 4;

/// A script that did not run.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// nft (library or program) refused or failed the script.
    #[error("nft: {0}")]
    Failed(String),
    /// The program could not be run.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The library's thread is gone (it could not enter the namespace).
    #[error("the libnftables thread stopped: {0}")]
    Stopped(String),
}

impl NftError {
    /// Whether nft could not be started at all (not installed).
    pub fn is_missing(&self) -> bool {
        matches!(self, NftError::Exec(ExecError::Spawn { .. }))
    }
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The few libnftables entry points canal uses.
#[derive(Clone, Copy)]
struct Lib {
    ctx_new: CtxNew,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    set_output_flags: CtxSetFlags,
    output: CtxBuffer,
    error: CtxBuffer,
    run: RunCmd,
}

/// libnftables, loaded once per process (never unloaded, so the function
/// pointers stay valid); None when it is not installed.
fn lib() -> Option<Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    *LIB.get_or_init(|| {
        // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols are
        // cast to the signatures libnftables.h declares for them.
        unsafe {
            let handle = ["libnftables.so.1", "libnftables.so"]
                .iter()
                .filter_map(|n| CString::new(*n).ok())
                .map(|n| libc::dlopen(n.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL))
                .find(|h| !h.is_null())?;
            let sym = |name: &str| -> Option<*mut c_void> {
                let c = CString::new(name).ok()?;
                let p = libc::dlsym(handle, c.as_ptr());
                (!p.is_null()).then_some(p)
            };
            Some(Lib {
                ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym("nft_ctx_new")?),
                buffer_output: std::mem::transmute::<*mut c_void, CtxInt>(sym(
                    "nft_ctx_buffer_output",
                )?),
                buffer_error: std::mem::transmute::<*mut c_void, CtxInt>(sym(
                    "nft_ctx_buffer_error",
                )?),
                set_output_flags: std::mem::transmute::<*mut c_void, CtxSetFlags>(sym(
                    "nft_ctx_output_set_flags",
                )?),
                output: std::mem::transmute::<*mut c_void, CtxBuffer>(sym(
                    "nft_ctx_get_output_buffer",
                )?),
                error: std::mem::transmute::<*mut c_void, CtxBuffer>(sym(
                    "nft_ctx_get_error_buffer",
                )?),
                run: std::mem::transmute::<*mut c_void, RunCmd>(sym("nft_run_cmd_from_buffer")?),
            })
        }
    })
}

/// Whether libnftables can be loaded on this node.
pub fn library_available() -> bool {
    lib().is_some()
}

struct Job {
    script: String,
    json: bool,
    reply: oneshot::Sender<Result<String, String>>,
}

/// How scripts are run.
#[derive(Debug, Clone)]
pub enum Runner {
    /// libnftables on its own thread.
    Library(mpsc::Sender<JobHandle>),
    /// `nft -f -` per script.
    Process(Exec),
}

/// An opaque job for the library thread.
pub struct JobHandle(Job);

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobHandle")
    }
}

impl Runner {
    /// The library where it loads (inside `exec`'s namespace), else the program.
    pub fn new(exec: &Exec) -> Runner {
        match lib() {
            Some(lib) => match spawn_library_thread(lib, exec.netns()) {
                Ok(tx) => return Runner::Library(tx),
                Err(e) => {
                    tracing::warn!("cannot start libnftables ({e}); running nft per transaction")
                }
            },
            None => tracing::info!("libnftables is not installed; running nft per transaction"),
        }
        Runner::Process(exec.clone())
    }

    /// The program, always (benchmarks compare the two).
    pub fn process(exec: &Exec) -> Runner {
        Runner::Process(exec.clone())
    }

    /// `library` or `process`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Runner::Library(_) => "library",
            Runner::Process(_) => "process",
        }
    }

    /// Runs `script` as one transaction; returns its output.
    pub async fn run(&self, script: &str) -> Result<String, NftError> {
        self.call(script, false).await
    }

    /// Runs a listing command with JSON output.
    pub async fn list_json(&self, command: &str) -> Result<String, NftError> {
        self.call(command, true).await
    }

    async fn call(&self, script: &str, json: bool) -> Result<String, NftError> {
        match self {
            Runner::Library(tx) => {
                let (reply, rx) = oneshot::channel();
                tx.send(JobHandle(Job {
                    script: script.to_string(),
                    json,
                    reply,
                }))
                .map_err(|_| NftError::Stopped("its channel is closed".into()))?;
                rx.await
                    .map_err(|_| NftError::Stopped("no reply".into()))?
                    .map_err(NftError::Failed)
            }
            Runner::Process(exec) => {
                let timeout = Duration::from_secs(60);
                let out = if json {
                    let args: Vec<&str> = std::iter::once("-j")
                        .chain(script.split_whitespace())
                        .collect();
                    exec.run("nft", &args, None, timeout).await
                } else {
                    exec.run("nft", &["-f", "-"], Some(script), timeout).await
                };
                match out {
                    Ok(o) => Ok(o),
                    Err(ExecError::Failed { stderr, .. }) => Err(NftError::Failed(stderr)),
                    Err(e) => Err(NftError::Exec(e)),
                }
            }
        }
    }
}

fn spawn_library_thread(lib: Lib, netns: Option<&Path>) -> io::Result<mpsc::Sender<JobHandle>> {
    let netns: Option<(PathBuf, File)> = match netns {
        Some(p) => Some((p.to_path_buf(), File::open(p)?)),
        None => None,
    };
    let (tx, rx) = mpsc::channel::<JobHandle>();
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    std::thread::Builder::new()
        .name("canal-nft".into())
        .spawn(move || {
            if let Some((path, file)) = &netns
                && let Err(e) = nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            {
                let _ = ready_tx.send(Err(io::Error::other(format!(
                    "entering {}: {e}",
                    path.display()
                ))));
                return;
            }
            let before = own_netfilter_sockets();
            // SAFETY: plain constructor; NULL is checked.
            let ctx = unsafe { (lib.ctx_new)(0) };
            if ctx.is_null() {
                let _ = ready_tx.send(Err(io::Error::other("nft_ctx_new failed")));
                return;
            }
            // SAFETY: ctx is a live context owned by this thread.
            unsafe {
                (lib.buffer_output)(ctx);
                (lib.buffer_error)(ctx);
            }
            register_own_writer(&before);
            let _ = ready_tx.send(Ok(()));
            while let Ok(JobHandle(job)) = rx.recv() {
                let result = run_job(&lib, ctx, &job);
                let _ = job.reply.send(result);
            }
            // The context (and its socket) lives as long as the process:
            // runners are few and long-lived, and freeing would need the
            // destructor symbol too.
        })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("the libnftables thread exited"))??;
    Ok(tx)
}

fn run_job(lib: &Lib, ctx: *mut c_void, job: &Job) -> Result<String, String> {
    let script =
        CString::new(job.script.as_str()).map_err(|_| "a script with a NUL byte".to_string())?;
    // SAFETY: ctx is live and used by this thread only; the buffers it
    // returns stay valid until the next command, and are copied at once.
    unsafe {
        (lib.set_output_flags)(ctx, if job.json { OUTPUT_JSON } else { 0 });
        let rc = (lib.run)(ctx, script.as_ptr());
        let read = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let out = read((lib.output)(ctx));
        let err = read((lib.error)(ctx));
        if rc == 0 {
            Ok(out)
        } else {
            let mut err = err.trim().to_string();
            err.truncate(2000);
            Err(err)
        }
    }
}

/// Inodes of this process's `NETLINK_NETFILTER` sockets in the calling
/// thread's namespace, with their port ids.
fn own_netfilter_sockets() -> Vec<(u64, u32)> {
    let fds: std::collections::BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let s = l.to_string_lossy().into_owned();
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let table = std::fs::read_to_string("/proc/thread-self/net/netlink").unwrap_or_default();
    parse_netlink_table(&table)
        .into_iter()
        .filter(|(proto, _, inode)| *proto == 12 && fds.contains(inode))
        .map(|(_, portid, inode)| (inode, portid))
        .collect()
}

/// `/proc/net/netlink` rows as (protocol, port id, inode).
fn parse_netlink_table(text: &str) -> Vec<(u32, u32, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let proto = f.get(1)?.parse().ok()?;
            // Port ids are printed as signed decimals.
            let portid = f.get(2)?.parse::<i64>().ok()? as u32;
            let inode = f.get(9)?.parse().ok()?;
            Some((proto, portid, inode))
        })
        .collect()
}

/// Registers this thread (the committing task's id is in every
/// generation message) and the library's new socket (its port id is in
/// every change message) as canal's own writers.
fn register_own_writer(before: &[(u64, u32)]) {
    let own = own_writers();
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    own.started(tid);
    for (inode, portid) in own_netfilter_sockets() {
        if !before.iter().any(|(i, _)| *i == inode) {
            own.started(portid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_table_rows() {
        let t = "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n\
00000000aa624fa9 12  -4096      00000000 0        0        0     2        0        77\n\
00000000a23419b3 0   123        00000000 0        0        0     2        0        1494\n";
        assert_eq!(
            parse_netlink_table(t),
            vec![(12, (-4096i64) as u32, 77), (0, 123, 1494)]
        );
    }
}
