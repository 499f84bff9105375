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
    /// A prebuilt nfnetlink batch to send instead of `script`
    /// ([`super::netlink`]), with the sequence numbers to be acknowledged.
    batch: Option<(Vec<u8>, Vec<u32>)>,
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

    /// Sends element changes of plain address sets as one nfnetlink batch
    /// (one transaction), bypassing libnftables' cache refresh. Ok(false):
    /// this runner cannot (`nft -f -`); run the script instead.
    pub async fn run_elements(
        &self,
        table: &str,
        deltas: &[super::netlink::SetDelta],
    ) -> Result<bool, NftError> {
        let Runner::Library(tx) = self else {
            return Ok(false);
        };
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let n = deltas
            .iter()
            .map(|d| d.add.len().div_ceil(1000) + d.delete.len().div_ceil(1000))
            .sum::<usize>() as u32
            + 2;
        let first = SEQ.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let batch = super::netlink::batch(table, deltas, first);
        let (reply, rx) = oneshot::channel();
        tx.send(JobHandle(Job {
            script: String::new(),
            json: false,
            batch: Some(batch),
            reply,
        }))
        .map_err(|_| NftError::Stopped("its channel is closed".into()))?;
        rx.await
            .map_err(|_| NftError::Stopped("no reply".into()))?
            .map_err(NftError::Failed)?;
        Ok(true)
    }

    async fn call(&self, script: &str, json: bool) -> Result<String, NftError> {
        match self {
            Runner::Library(tx) => {
                let (reply, rx) = oneshot::channel();
                tx.send(JobHandle(Job {
                    script: script.to_string(),
                    json,
                    batch: None,
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
            // Opened on the first batch (in this namespace) and kept.
            let mut socket: Option<BatchSocket> = None;
            while let Ok(JobHandle(job)) = rx.recv() {
                let result = match &job.batch {
                    Some((bytes, acked)) => send_batch(&mut socket, bytes, acked),
                    None => run_job(&lib, ctx, &job),
                };
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

/// The library thread's own `NETLINK_NETFILTER` socket for batches.
struct BatchSocket(std::os::fd::OwnedFd);

impl BatchSocket {
    fn open() -> Result<BatchSocket, String> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(format!("netlink socket: {}", io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = BatchSocket(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let raw = std::os::fd::AsRawFd::as_raw_fd(&sock.0);
        // SAFETY: zeroed sockaddr_nl is valid (pid 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: valid pointers and lengths to live locals.
        unsafe {
            if libc::bind(raw, (&addr as *const libc::sockaddr_nl).cast(), len) < 0 {
                return Err(format!("netlink bind: {}", io::Error::last_os_error()));
            }
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            let mut got = len;
            if libc::getsockname(raw, (&mut addr as *mut libc::sockaddr_nl).cast(), &mut got) < 0 {
                return Err(format!(
                    "netlink getsockname: {}",
                    io::Error::last_os_error()
                ));
            }
        }
        // Its change notifications carry this port id: canal's own.
        own_writers().started(addr.nl_pid);
        Ok(sock)
    }
}

/// Sends one batch and waits for every ack; any error fails it (the kernel
/// then applied nothing of it: a batch is one transaction).
fn send_batch(
    socket: &mut Option<BatchSocket>,
    bytes: &[u8],
    acked: &[u32],
) -> Result<String, String> {
    use std::os::fd::AsRawFd;
    if socket.is_none() {
        *socket = Some(BatchSocket::open()?);
    }
    let Some(sock) = socket.as_ref() else {
        return Err("no netlink socket".into());
    };
    let raw = sock.0.as_raw_fd();
    // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: bytes and kernel are live for the call.
    let sent = unsafe {
        libc::sendto(
            raw,
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 || sent as usize != bytes.len() {
        let e = io::Error::last_os_error();
        *socket = None;
        return Err(format!("sending the nfnetlink batch: {e}"));
    }
    let mut pending: std::collections::BTreeSet<u32> = acked.iter().copied().collect();
    let mut buf = vec![0u8; 65536];
    while !pending.is_empty() {
        // SAFETY: buf is live and writable for its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            // Acks may still come: a new socket, so they never mix with the next batch's.
            *socket = None;
            return Err(format!("reading the nfnetlink acks: {e}"));
        }
        for (seq, errno) in super::netlink::parse_acks(&buf[..n as usize]) {
            if errno != 0 {
                *socket = None;
                return Err(format!(
                    "the kernel refused the element batch: {}",
                    io::Error::from_raw_os_error(-errno)
                ));
            }
            pending.remove(&seq);
        }
    }
    Ok(String::new())
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
