//! Noticing, within milliseconds and without re-reading the tables, that
//! someone else changed the node's firewall (a firewall reload, `iptables
//! -F`, a deleted hook, `ipset flush`), so the owner of the rules can repair
//! them at once instead of at the next periodic drift check.
//!
//! - [`FirewallWatch`]: nf_tables change notifications (`NETLINK_NETFILTER`,
//!   group `NFNLGRP_NFTABLES`, in the watcher's network namespace) as
//!   [`Change`]s on a broadcast channel, one per object a foreign
//!   transaction touched. Changes committed by processes canal-agent
//!   started ([`own_writers`]: its `iptables-restore` runs) are dropped by
//!   the port id / pid the kernel puts into each notification, so the
//!   agent's own syncs cost nothing extra. Serves any dataplane that
//!   programs nf_tables (iptables-nft today, a native nftables table next).
//! - [`ipset_headers`]: the headers of every ipset (name, type, entry
//!   count) in one netlink dump, because ipset changes send no notification.
//! - [`legacy_fingerprint`]: entry counts and sizes of the legacy iptables
//!   tables (`IPT_SO_GET_INFO`), for iptables-legacy hosts, which send no
//!   notifications either.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::nfnl::{self, Notification, Object, SetHeader};
use super::nlattr::set_rcvtimeo;

/// Which iptables backend the node's tools use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// iptables-nft: rules are nf_tables objects; changes are notified.
    Nft,
    /// iptables-legacy: x_tables; nothing is notified.
    Legacy,
}

/// The backend named by `iptables-save --version` (`iptables-save v1.8.9
/// (nf_tables)` / `(legacy)`; versions before 1.8 are legacy).
pub fn backend_of(version: &str) -> Backend {
    if version.contains("nf_tables") {
        Backend::Nft
    } else {
        Backend::Legacy
    }
}

/// Processes canal started that write the firewall: their changes are the
/// agent's own, not drift. Register a child after spawning it and before
/// giving it its input, so its commit cannot be seen first.
#[derive(Debug, Default)]
pub struct OwnWriters {
    /// pid -> when it exited (None: still running).
    pids: Mutex<HashMap<u32, Option<Instant>>>,
}

/// How long an exited writer's pid still counts as ours: its notifications
/// are queued before it exits, but the watcher may read them a little later.
const EXITED_GRACE: Duration = Duration::from_secs(5);

impl OwnWriters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Option<Instant>>> {
        // A panic while holding the lock leaves a plain map: keep using it.
        self.pids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A writer started.
    pub fn started(&self, pid: u32) {
        let mut pids = self.lock();
        pids.retain(|_, exited| exited.is_none_or(|t| t.elapsed() < EXITED_GRACE));
        pids.insert(pid, None);
    }

    /// A writer exited.
    pub fn exited(&self, pid: u32) {
        if let Some(e) = self.lock().get_mut(&pid) {
            *e = Some(Instant::now());
        }
    }

    /// Whether `pid` is (or recently was) one of ours.
    pub fn contains(&self, pid: u32) -> bool {
        self.lock()
            .get(&pid)
            .is_some_and(|e| e.is_none_or(|t| t.elapsed() < EXITED_GRACE))
    }
}

/// The process-wide registry of canal's firewall writers.
pub fn own_writers() -> &'static OwnWriters {
    static OWN: OnceLock<OwnWriters> = OnceLock::new();
    OWN.get_or_init(OwnWriters::default)
}

/// A change someone else made to nf_tables.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// An object of a table changed.
    Nft {
        /// `NFPROTO_*` family (2: ip, the iptables-nft tables).
        family: u8,
        /// Table name.
        table: String,
        /// What changed.
        object: ObjectKind,
        /// The chain, for chain and rule changes.
        chain: Option<String>,
    },
    /// Notifications were lost (the socket's buffer overran or a
    /// subscriber lagged): anything may have changed.
    Lost,
}

/// [`Object`] without the transaction marker (ordered, for deduplication).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A table.
    Table,
    /// A chain.
    Chain,
    /// A rule.
    Rule,
    /// An nf_tables set or element.
    Set,
}

/// Turns a stream of notifications into the foreign changes it holds:
/// notifications are grouped per transaction (they end with a generation
/// message), and a transaction whose committer is one of ours is dropped.
#[derive(Debug, Default)]
pub struct Transactions {
    pending: BTreeSet<Change>,
    /// Port id of the pending transaction's messages.
    portid: Option<u32>,
}

impl Transactions {
    /// Feeds notifications; returns the foreign changes of every
    /// transaction they complete. `ours` says whether a port id or pid
    /// belongs to a writer canal started.
    pub fn feed(&mut self, notes: &[Notification], ours: impl Fn(u32) -> bool) -> Vec<Change> {
        let mut out = Vec::new();
        for n in notes {
            if n.object == Object::Generation {
                let own = ours(n.portid)
                    || self.portid.is_some_and(&ours)
                    || n.proc_pid.is_some_and(&ours);
                let changes = std::mem::take(&mut self.pending);
                self.portid = None;
                if !own {
                    out.extend(changes);
                }
                continue;
            }
            let object = match n.object {
                Object::Table => ObjectKind::Table,
                Object::Chain => ObjectKind::Chain,
                Object::Rule => ObjectKind::Rule,
                Object::Set => ObjectKind::Set,
                Object::Generation => continue,
            };
            self.portid.get_or_insert(n.portid);
            self.pending.insert(Change::Nft {
                family: n.family,
                table: n.table.clone().unwrap_or_default(),
                object,
                chain: n.chain.clone(),
            });
        }
        out
    }

    /// Notifications were lost: the pending transaction is incomplete.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.portid = None;
    }
}

/// Subscribes to nf_tables change notifications of one network namespace
/// and publishes the foreign ones. The reader thread stops when the watch
/// is dropped.
#[derive(Debug)]
pub struct FirewallWatch {
    tx: broadcast::Sender<Change>,
    stop: Arc<AtomicBool>,
}

/// Receive buffer of the notification socket: a cold sync of 20,000 rules
/// notifies about as many objects; an overrun only costs a full check.
const RCVBUF: usize = 8 << 20;

impl FirewallWatch {
    /// Starts watching the namespace at `netns` (None: the caller's).
    pub fn start(netns: Option<&Path>) -> io::Result<FirewallWatch> {
        let socket = socket_in(netns, |s| {
            s.bind(&SocketAddr::new(0, 0))?;
            s.add_membership(nfnl::GROUP_NFTABLES)?;
            force_rcvbuf(s, RCVBUF);
            // Wake up now and then to notice that the watch was dropped.
            set_rcvtimeo(s, Duration::from_millis(500))
        })?;
        let (tx, _) = broadcast::channel(4096);
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_tx, thread_stop) = (tx.clone(), stop.clone());
        std::thread::Builder::new()
            .name("canal-nft-watch".into())
            .spawn(move || read_loop(socket, thread_tx, thread_stop))?;
        Ok(FirewallWatch { tx, stop })
    }

    /// A receiver of every foreign change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }
}

impl Drop for FirewallWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The watch of the agent's own namespace, started on first use; None when
/// notifications cannot be subscribed to (logged once; callers poll instead).
pub fn host_watch() -> Option<&'static FirewallWatch> {
    static HOST: OnceLock<Option<FirewallWatch>> = OnceLock::new();
    HOST.get_or_init(|| match FirewallWatch::start(None) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "cannot subscribe to nf_tables change notifications ({e}); firewall changes are found by polling"
            );
            None
        }
    })
    .as_ref()
}

fn read_loop(socket: Socket, tx: broadcast::Sender<Change>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 1 << 16];
    let mut tx_state = Transactions::default();
    let own = own_writers();
    while !stop.load(Ordering::Relaxed) {
        match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => {
                let parsed = nfnl::parse_notifications(&buf[..n]);
                if parsed.malformed > 0 {
                    debug!(
                        malformed = parsed.malformed,
                        "undecodable nf_tables notification"
                    );
                }
                for change in tx_state.feed(&parsed.notifications, |pid| own.contains(pid)) {
                    // No subscriber yet: nothing to tell.
                    let _ = tx.send(change);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tx_state.reset();
                let _ = tx.send(Change::Lost);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                warn!("reading nf_tables notifications: {e}; stopping the watch");
                let _ = tx.send(Change::Lost);
                return;
            }
        }
    }
}

/// A netlink socket of the netfilter family created inside `netns` (a
/// socket stays in the namespace it was created in), set up by `setup`.
fn socket_in(
    netns: Option<&Path>,
    setup: impl FnOnce(&mut Socket) -> io::Result<()> + Send + 'static,
) -> io::Result<Socket> {
    let make = move || -> io::Result<Socket> {
        let mut s = Socket::new(NETLINK_NETFILTER)?;
        setup(&mut s)?;
        Ok(s)
    };
    match netns {
        None => make(),
        Some(path) => run_in_netns(path, make),
    }
}

/// Runs `f` on a fresh thread inside the network namespace at `path`.
fn run_in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let file = File::open(path)?;
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("canal-netns".into())
        .spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("entering {}: {e}", path.display())))?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

fn force_rcvbuf(s: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    // SO_RCVBUFFORCE needs CAP_NET_ADMIN, which the agent has; without it
    // the default buffer only means an earlier overrun (a full check).
    let _ = setsockopt(&fd_of(s), sockopt::RcvBufForce, &bytes);
}

/// The socket's descriptor, borrowed for nix.
fn fd_of(s: &Socket) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    s.as_fd()
}

/// Reads ipset headers in one namespace over a socket kept open.
#[derive(Debug)]
pub struct IpsetProbe {
    socket: Mutex<Socket>,
    seq: std::sync::atomic::AtomicU32,
}

impl IpsetProbe {
    /// A probe for the namespace at `netns` (None: the caller's).
    pub fn open(netns: Option<&Path>) -> io::Result<IpsetProbe> {
        let socket = socket_in(netns, |s| {
            s.bind_auto()?;
            s.connect(&SocketAddr::new(0, 0))?;
            set_rcvtimeo(s, Duration::from_secs(2))
        })?;
        Ok(IpsetProbe {
            socket: Mutex::new(socket),
            seq: std::sync::atomic::AtomicU32::new(1),
        })
    }

    /// Every set's header (blocking; microseconds).
    pub fn headers(&self) -> io::Result<Vec<SetHeader>> {
        let socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        socket.send(&nfnl::ipset_headers_request(seq), 0)?;
        let mut sets = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            match nfnl::parse_ipset_headers(&buf[..n], &mut sets) {
                Ok(true) => return Ok(sets),
                Ok(false) => {}
                Err(e) => return Err(io::Error::other(e)),
            }
        }
    }
}

/// `ipset_headers` through a fresh probe (tests, one-off checks).
pub fn ipset_headers(netns: Option<&Path>) -> io::Result<Vec<SetHeader>> {
    IpsetProbe::open(netns)?.headers()
}

/// Entry count and size of one legacy iptables table, or None when the
/// table does not exist.
pub type TableInfo = Option<(u32, u32)>;

/// `struct ipt_getinfo` (linux/netfilter_ipv4/ip_tables.h).
#[repr(C)]
struct IptGetinfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; 5],
    underflow: [u32; 5],
    num_entries: u32,
    size: u32,
}

/// `IPT_SO_GET_INFO`.
const IPT_SO_GET_INFO: libc::c_int = 64;

/// Reads legacy tables' entry counts and sizes over a raw socket (no
/// process, no rule listing): any rule added, deleted or flushed changes
/// them. Only for iptables-legacy hosts (it would load the legacy tables on
/// an nf_tables host).
#[derive(Debug)]
pub struct LegacyProbe {
    fd: OwnedFd,
}

impl LegacyProbe {
    /// A probe for the namespace at `netns` (None: the caller's).
    pub fn open(netns: Option<&Path>) -> io::Result<LegacyProbe> {
        let make = || -> io::Result<OwnedFd> {
            use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
            socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Raw,
            )
            .map_err(io::Error::from)
        };
        let fd = match netns {
            None => make()?,
            Some(p) => run_in_netns(p, make)?,
        };
        Ok(LegacyProbe { fd })
    }

    /// The info of each table.
    pub fn fingerprint(&self, tables: &[&str]) -> Vec<TableInfo> {
        tables.iter().map(|t| self.table(t)).collect()
    }

    fn table(&self, name: &str) -> TableInfo {
        let mut info = IptGetinfo {
            name: [0; 32],
            valid_hooks: 0,
            hook_entry: [0; 5],
            underflow: [0; 5],
            num_entries: 0,
            size: 0,
        };
        let bytes = name.as_bytes();
        let n = bytes.len().min(31);
        info.name[..n].copy_from_slice(&bytes[..n]);
        let mut len = std::mem::size_of::<IptGetinfo>() as libc::socklen_t;
        // SAFETY: a valid fd, and a buffer of the size passed (the kernel
        // reads the table name from it and writes at most `len` bytes).
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_IP,
                IPT_SO_GET_INFO,
                (&mut info as *mut IptGetinfo).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some((info.num_entries, info.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(object: Object, portid: u32, chain: Option<&str>) -> Notification {
        Notification {
            portid,
            object,
            family: 2,
            table: Some("filter".into()),
            chain: chain.map(String::from),
            proc_pid: None,
        }
    }

    #[test]
    fn own_transactions_are_dropped_foreign_ones_deduplicated() {
        let mut t = Transactions::default();
        let ours = |p: u32| p == 100;
        let notes = vec![
            note(Object::Rule, 100, Some("FORWARD")),
            note(Object::Generation, 100, None),
            note(Object::Rule, 200, Some("FORWARD")),
            note(Object::Rule, 200, Some("FORWARD")),
            note(Object::Chain, 200, Some("CANAL-TW-x")),
        ];
        let out = t.feed(&notes, ours);
        assert!(
            out.is_empty(),
            "the foreign transaction is not complete yet"
        );
        let out = t.feed(&[note(Object::Generation, 200, None)], ours);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out.contains(&Change::Nft {
            family: 2,
            table: "filter".into(),
            object: ObjectKind::Chain,
            chain: Some("CANAL-TW-x".into()),
        }));
    }

    #[test]
    fn the_committing_pid_also_identifies_our_writers() {
        // A writer whose socket got another port id (taken by someone
        // else): its generation message still names its pid.
        let mut t = Transactions::default();
        let mut generation = note(Object::Generation, 7, None);
        generation.proc_pid = Some(100);
        let out = t.feed(&[note(Object::Rule, 7, Some("FORWARD")), generation], |p| {
            p == 100
        });
        assert!(out.is_empty());
    }

    #[test]
    fn registry_forgets_exited_writers_after_a_grace() {
        let own = OwnWriters::default();
        own.started(5);
        assert!(own.contains(5));
        own.exited(5);
        assert!(own.contains(5), "still within the grace period");
        own.lock()
            .insert(5, Some(Instant::now() - EXITED_GRACE * 2));
        assert!(!own.contains(5));
        assert!(!own.contains(6));
    }

    #[test]
    fn backend_from_the_version_line() {
        assert_eq!(backend_of("iptables-save v1.8.9 (nf_tables)"), Backend::Nft);
        assert_eq!(backend_of("iptables-save v1.8.9 (legacy)"), Backend::Legacy);
        assert_eq!(backend_of("iptables-save v1.6.1"), Backend::Legacy);
    }
}
