//! `spec.policy.established: Cut`: after a change is programmed, the
//! conntrack entries of flows the new policy denies are deleted, so a deny
//! also ends TCP connections and UDP flows that were established before it
//! (otherwise the `ct state established` accept in front of every policy
//! keeps them flowing until conntrack forgets them).
//!
//! Which entries go is decided by the pure evaluator ([`super::eval`])
//! against the node model just programmed, the very semantics `kubectl
//! canal explain` reports, so an allowed flow is never cut: only entries
//! with a local pod's address on either end are candidates, each is
//! evaluated as the connection its original direction opened (after DNAT:
//! the reply tuple's source is the real destination), and only a denied
//! one is deleted, by its exact tuple and conntrack id (ctnetlink; a
//! small encoder/decoder here, like [`super::nfnl`], over `netlink-sys`).
//!
//! After the delete the next packet of the flow is picked up by conntrack
//! as NEW (TCP with `nf_conntrack_tcp_loose`, the kernel default; UDP
//! always) and meets the policy chains again, which drop it.
//! Known limit: a TCP peer that is allowed to open the reverse connection
//! (e.g. the server of a denied ingress flow is not egress-isolated) can
//! re-establish the flow mid-stream by sending first after the cut; its
//! next packet is a NEW connection of its own, which policy allows.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use canal_crds::{EstablishedFlows, Protocol};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NlasIterator};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use tracing::{debug, info, warn};

use super::antispoof::Sources;
use super::eval::{Connection, Side, evaluate};
use super::model::NodeModel;

/// `NFNL_SUBSYS_CTNETLINK`.
const SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

// enum ctattr_type / ctattr_tuple / ctattr_ip / ctattr_l4proto
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Source port (0 for protocols without ports).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// A conntrack entry as the dump shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The original direction (who opened the flow).
    pub orig: Tuple,
    /// The reply direction (its source is the destination after DNAT).
    pub reply: Tuple,
    /// conntrack's id of the entry (deletes name it, so a new entry with
    /// the same tuple created meanwhile survives).
    pub id: Option<u32>,
    /// conntrack zone.
    pub zone: Option<u16>,
}

impl Entry {
    /// The connection the entry's first packet was, as the policy chains
    /// saw it (after DNAT, before SNAT), or None for protocols policy does
    /// not match on (ICMP and others are left alone).
    pub fn connection(&self, sides: &Sides) -> Option<Connection> {
        let protocol = match self.orig.proto {
            IPPROTO_TCP => Protocol::TCP,
            IPPROTO_UDP => Protocol::UDP,
            IPPROTO_SCTP => Protocol::SCTP,
            _ => return None,
        };
        let (src, dst) = (self.orig.src, self.reply.src);
        Some(Connection {
            from: sides.side(src),
            to: sides.side(dst),
            src,
            dst,
            protocol,
            port: self.reply.sport,
        })
    }
}

/// Which addresses are this node's pods and which the node itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sides {
    /// Local pod addresses, by interface.
    pub pods: BTreeMap<IpAddr, String>,
    /// The node's own addresses (host traffic is never policed).
    pub host: BTreeSet<IpAddr>,
}

impl Sides {
    /// The local pods of `model` (by their addresses) and `host`.
    pub fn of(model: &NodeModel, host: BTreeSet<IpAddr>) -> Sides {
        let mut pods = BTreeMap::new();
        for (iface, s) in model.sources.endpoints.iter().flatten() {
            if let Sources::Addresses(addrs) = s {
                for a in addrs {
                    pods.insert(*a, iface.clone());
                }
            }
        }
        Sides { pods, host }
    }

    fn side(&self, ip: IpAddr) -> Side {
        match self.pods.get(&ip) {
            Some(iface) => Side::Pod(iface.clone()),
            None if self.host.contains(&ip) => Side::Host,
            None => Side::Remote,
        }
    }

    /// Whether `e` touches a local pod (only those can be denied here).
    fn candidate(&self, e: &Entry) -> bool {
        self.pods.contains_key(&e.orig.src) || self.pods.contains_key(&e.reply.src)
    }
}

/// The entries of `entries` the node model denies: exactly those to cut.
pub fn denied<'a>(model: &NodeModel, sides: &Sides, entries: &'a [Entry]) -> Vec<&'a Entry> {
    if !model.enabled {
        return Vec::new();
    }
    entries
        .iter()
        .filter(|e| sides.candidate(e))
        .filter(|e| {
            e.connection(sides)
                .is_some_and(|c| !evaluate(model, &c).allowed)
        })
        .collect()
}

/// Whether anything in `model` can deny a flow (else no dump is needed).
pub fn can_deny(model: &NodeModel) -> bool {
    use super::model::Isolation;
    model.enabled
        && (model.endpoint_to_host == canal_crds::EndpointToHostAction::Drop
            || model.endpoints.values().any(|e| {
                matches!(e.ingress, Isolation::By(_)) || matches!(e.egress, Isolation::By(_))
            }))
}

// ---- messages -------------------------------------------------------------

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `finish`
    buf.extend_from_slice(&((SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: family, version, res_id (big endian)
    buf.extend_from_slice(&[family, 0, 0, 0]);
}

fn finish(buf: &mut [u8]) {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = (4 + value.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let mut v = Vec::new();
    inner(&mut v);
    attr(buf, kind | NLA_F_NESTED, &v);
}

/// The dump request of one family's conntrack table.
pub fn dump_request(seq: u32, family: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    header(
        &mut b,
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
    );
    finish(&mut b);
    b
}

/// The delete request of exactly `e` (its original tuple, id and zone).
pub fn delete_request(seq: u32, e: &Entry) -> Vec<u8> {
    let family = match e.orig.src {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    };
    let mut b = Vec::with_capacity(96);
    header(
        &mut b,
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family,
    );
    nested(&mut b, CTA_TUPLE_ORIG, |t| {
        nested(t, CTA_TUPLE_IP, |ip| match (e.orig.src, e.orig.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                attr(ip, CTA_IP_V4_SRC, &s.octets());
                attr(ip, CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                attr(ip, CTA_IP_V6_SRC, &v6(s).octets());
                attr(ip, CTA_IP_V6_DST, &v6(d).octets());
            }
        });
        nested(t, CTA_TUPLE_PROTO, |p| {
            attr(p, CTA_PROTO_NUM, &[e.orig.proto]);
            attr(p, CTA_PROTO_SRC_PORT, &e.orig.sport.to_be_bytes());
            attr(p, CTA_PROTO_DST_PORT, &e.orig.dport.to_be_bytes());
        });
    });
    if let Some(id) = e.id {
        attr(&mut b, CTA_ID, &id.to_be_bytes());
    }
    if let Some(z) = e.zone.filter(|z| *z != 0) {
        attr(&mut b, CTA_ZONE, &z.to_be_bytes());
    }
    finish(&mut b);
    b
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// What one receive buffer held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Entries decoded.
    pub entries: Vec<Entry>,
    /// NLMSG_ERROR codes (0: an ack), in order.
    pub errors: Vec<i32>,
    /// The dump ended.
    pub done: bool,
    /// Messages that did not decode.
    pub malformed: usize,
}

/// Decodes one receive buffer of ctnetlink replies.
pub fn parse(buf: &[u8]) -> Reply {
    let mut out = Reply::default();
    let mut at = 0;
    while at < buf.len() {
        let Ok(msg) = NetlinkBuffer::new_checked(&buf[at..]) else {
            out.malformed += 1;
            break;
        };
        let len = msg.length() as usize;
        if len < 16 {
            out.malformed += 1;
            break;
        }
        let payload = msg.payload();
        match msg.message_type() {
            NLMSG_DONE => out.done = true,
            NLMSG_ERROR if payload.len() >= 4 => {
                let mut code = [0u8; 4];
                code.copy_from_slice(&payload[..4]);
                out.errors.push(i32::from_ne_bytes(code));
            }
            t if t >> 8 == SUBSYS_CTNETLINK && payload.len() >= 4 => {
                match parse_entry(&payload[4..]) {
                    Some(e) => out.entries.push(e),
                    None => out.malformed += 1,
                }
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    out
}

fn parse_entry(attrs: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply, mut id, mut zone) = (None, None, None, None);
    for nla in NlasIterator::new(attrs) {
        let nla = nla.ok()?;
        let v = nla.value();
        match nla.kind() & NLA_TYPE_MASK {
            CTA_TUPLE_ORIG => orig = parse_tuple(v),
            CTA_TUPLE_REPLY => reply = parse_tuple(v),
            CTA_ID if v.len() >= 4 => id = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            CTA_ZONE if v.len() >= 2 => zone = Some(u16::from_be_bytes([v[0], v[1]])),
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        reply: reply?,
        id,
        zone,
    })
}

fn parse_tuple(attrs: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for nla in NlasIterator::new(attrs) {
        let nla = nla.ok()?;
        match nla.kind() & NLA_TYPE_MASK {
            CTA_TUPLE_IP => {
                for a in NlasIterator::new(nla.value()) {
                    let a = a.ok()?;
                    let v = a.value();
                    let ip = match v.len() {
                        4 => IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
                        16 => {
                            let mut o = [0u8; 16];
                            o.copy_from_slice(v);
                            IpAddr::V6(Ipv6Addr::from(o))
                        }
                        _ => continue,
                    };
                    match a.kind() & NLA_TYPE_MASK {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = Some(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in NlasIterator::new(nla.value()) {
                    let a = a.ok()?;
                    let v = a.value();
                    match (a.kind() & NLA_TYPE_MASK, v.len()) {
                        (CTA_PROTO_NUM, 1..) => proto = Some(v[0]),
                        (CTA_PROTO_SRC_PORT, 2..) => sport = u16::from_be_bytes([v[0], v[1]]),
                        (CTA_PROTO_DST_PORT, 2..) => dport = u16::from_be_bytes([v[0], v[1]]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
    })
}

// ---- I/O ------------------------------------------------------------------

/// A cut that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    /// The conntrack socket or the namespace could not be opened.
    #[error("opening a ctnetlink socket{}: {source}", netns_note(.netns))]
    Open {
        netns: Option<PathBuf>,
        #[source]
        source: io::Error,
    },
    /// Dumping the conntrack table failed.
    #[error("dumping the conntrack table: {0}")]
    Dump(#[source] io::Error),
}

fn netns_note(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

/// What one cut did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutStats {
    /// Entries dumped.
    pub scanned: usize,
    /// Entries the model denies.
    pub denied: usize,
    /// Of those, deleted (or already gone).
    pub deleted: usize,
    /// Of the deleted, IPv6 entries.
    pub deleted_v6: usize,
    /// Deletes the kernel refused.
    pub failed: usize,
}

struct Conn {
    socket: Socket,
    seq: u32,
}

impl Conn {
    fn open() -> io::Result<Conn> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_rcvtimeo(&socket, Duration::from_secs(2))?;
        Ok(Conn { socket, seq: 1 })
    }

    fn dump(&mut self, family: u8) -> io::Result<Vec<Entry>> {
        self.seq += 1;
        self.socket.send(&dump_request(self.seq, family), 0)?;
        let mut entries = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let r = parse(&buf[..n]);
            entries.extend(r.entries);
            if let Some(&code) = r.errors.iter().find(|c| **c != 0) {
                return Err(io::Error::from_raw_os_error(-code));
            }
            if r.done || n == 0 {
                return Ok(entries);
            }
        }
    }

    /// Deletes `e`; Ok(true) when deleted or already gone.
    fn delete(&mut self, e: &Entry) -> io::Result<bool> {
        self.seq += 1;
        self.socket.send(&delete_request(self.seq, e), 0)?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let r = parse(&buf[..n]);
            if let Some(&code) = r.errors.first() {
                // ENOENT: it ended (or was replaced) meanwhile: nothing to cut.
                return Ok(code == 0 || code == -libc::ENOENT);
            }
            if n == 0 {
                return Ok(false);
            }
        }
    }
}

fn set_rcvtimeo(s: &Socket, d: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    use nix::sys::time::TimeVal;
    use std::os::fd::{AsRawFd, BorrowedFd};
    let tv = TimeVal::new(d.as_secs() as _, d.subsec_micros() as _);
    // SAFETY: the fd belongs to `s`, which outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(io::Error::from)
}

/// The node's own addresses (in the calling thread's namespace).
fn host_addresses() -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                out.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                out.insert(IpAddr::V6(v6.ip()));
            }
        }
    }
    out
}

/// Dumps both families' conntrack tables in the namespace at `netns`
/// (None: the caller's) and deletes every entry `model` denies. Blocking.
pub fn cut_blocking(netns: Option<&Path>, model: &NodeModel) -> Result<CutStats, CutError> {
    let open_err = |source| CutError::Open {
        netns: netns.map(Path::to_path_buf),
        source,
    };
    // A socket and getifaddrs see the namespace of the thread that made
    // them: enter the namespace on a thread of our own.
    let (mut conn, host) = match netns {
        None => (Conn::open().map_err(open_err)?, host_addresses()),
        Some(path) => {
            let file = std::fs::File::open(path).map_err(open_err)?;
            std::thread::scope(|s| {
                s.spawn(|| -> io::Result<(Conn, BTreeSet<IpAddr>)> {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)?;
                    Ok((Conn::open()?, host_addresses()))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
            })
            .map_err(open_err)?
        }
    };
    let sides = Sides::of(model, host);
    let mut stats = CutStats::default();
    for family in [AF_INET, AF_INET6] {
        let entries = match conn.dump(family) {
            Ok(e) => e,
            // No IPv6 conntrack on this node: nothing to cut there.
            Err(e) if family == AF_INET6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                continue;
            }
            Err(e) => return Err(CutError::Dump(e)),
        };
        stats.scanned += entries.len();
        for e in denied(model, &sides, &entries) {
            stats.denied += 1;
            match conn.delete(e) {
                Ok(true) => {
                    stats.deleted += 1;
                    stats.deleted_v6 += usize::from(family == AF_INET6);
                }
                Ok(false) => stats.failed += 1,
                Err(err) => {
                    debug!(entry = ?e, "deleting a conntrack entry: {err}");
                    stats.failed += 1;
                }
            }
        }
    }
    Ok(stats)
}

// ---- the enforcer's hook --------------------------------------------------

/// Metrics of the cut.
#[derive(Clone, Debug)]
pub struct CutMetrics {
    /// Entries deleted because policy now denies them.
    pub entries: IntCounterVec,
    /// Cuts or deletes that failed, by stage.
    pub failures: IntCounterVec,
    /// Duration of a cut pass (dump, evaluation, deletes).
    pub duration: Histogram,
}

/// The process's cut metrics (registered on the agent's registry by
/// [`register`]; shared by every enforcer of the process).
pub static METRICS: LazyLock<CutMetrics> = LazyLock::new(|| CutMetrics {
    entries: IntCounterVec::new(
        Opts::new(
            "canal_policy_conntrack_cut_entries_total",
            "Conntrack entries deleted because a programmed policy change denies their flow (spec.policy.established: Cut), by family.",
        ),
        &["family"],
    )
    .unwrap_or_else(|e| unreachable!("static metric options are valid: {e}")),
    failures: IntCounterVec::new(
        Opts::new(
            "canal_policy_conntrack_cut_failures_total",
            "Cut passes or single conntrack deletes that failed, by stage (open, dump, delete).",
        ),
        &["stage"],
    )
    .unwrap_or_else(|e| unreachable!("static metric options are valid: {e}")),
    duration: Histogram::with_opts(
        HistogramOpts::new(
            "canal_policy_conntrack_cut_duration_seconds",
            "Duration of a conntrack cut pass after a policy change (dump, evaluation, deletes).",
        )
        .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
    )
    .unwrap_or_else(|e| unreachable!("static metric options are valid: {e}")),
});

/// Registers the cut metrics on `registry`.
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    let m = &*METRICS;
    registry.register(Box::new(m.entries.clone()))?;
    registry.register(Box::new(m.failures.clone()))?;
    registry.register(Box::new(m.duration.clone()))?;
    for f in ["IPv4", "IPv6"] {
        m.entries.with_label_values(&[f]);
    }
    for s in ["open", "dump", "delete"] {
        m.failures.with_label_values(&[s]);
    }
    Ok(())
}

/// Cuts the flows `model` denies after it was programmed, when
/// `spec.policy.established` is `Cut`; remembers the model so an
/// unchanged one is not scanned again.
#[derive(Debug, Default)]
pub struct Established {
    last: Option<NodeModel>,
}

impl Established {
    /// Runs after every successfully programmed sync. Failures are
    /// counted and logged, never fatal: the rules are in place either way.
    pub async fn after_apply(
        &mut self,
        model: &NodeModel,
        mode: EstablishedFlows,
        netns: Option<&Path>,
    ) -> Option<CutStats> {
        if mode == EstablishedFlows::Keep || !can_deny(model) {
            self.last = None;
            return None;
        }
        if self.last.as_ref() == Some(model) {
            return None;
        }
        self.last = Some(model.clone());
        let started = Instant::now();
        let (m, ns) = (model.clone(), netns.map(Path::to_path_buf));
        let joined =
            tokio::task::spawn_blocking(move || cut_blocking(ns.as_deref(), &m)).await;
        METRICS.duration.observe(started.elapsed().as_secs_f64());
        let result = match joined {
            Ok(r) => r,
            Err(e) => {
                warn!("conntrack cut task failed: {e}");
                METRICS.failures.with_label_values(&["dump"]).inc();
                self.last = None;
                return None;
            }
        };
        match result {
            Ok(stats) => {
                if stats.deleted > 0 {
                    let v4 = stats.deleted - stats.deleted_v6;
                    METRICS.entries.with_label_values(&["IPv4"]).inc_by(v4 as u64);
                    METRICS
                        .entries
                        .with_label_values(&["IPv6"])
                        .inc_by(stats.deleted_v6 as u64);
                    info!(
                        deleted = stats.deleted,
                        scanned = stats.scanned,
                        failed = stats.failed,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "cut established flows the new policy denies"
                    );
                }
                if stats.failed > 0 {
                    METRICS
                        .failures
                        .with_label_values(&["delete"])
                        .inc_by(stats.failed as u64);
                    // Try again on the next sync.
                    self.last = None;
                }
                Some(stats)
            }
            Err(e) => {
                let stage = match e {
                    CutError::Open { .. } => "open",
                    CutError::Dump(_) => "dump",
                };
                warn!(stage, "cutting denied established flows: {e}");
                METRICS.failures.with_label_values(&[stage]).inc();
                self.last = None;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use canal_crds::{
        CompiledPolicy, Endpoint, NodePolicySetSpec, Peer, PeerSelector, PeerSetSpec, PortMatch,
        Rule,
    };

    use super::*;
    use crate::policy::model::build;
    use crate::policy::render::PolicyInputs;

    fn tuple(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
        }
    }

    fn entry(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Entry {
        Entry {
            orig: tuple(src, dst, proto, sport, dport),
            reply: tuple(dst, src, proto, dport, sport),
            id: Some(7),
            zone: None,
        }
    }

    /// A kernel-shaped IPCTNL_MSG_CT_NEW message of `e` (as a dump sends it).
    fn dump_message(e: &Entry) -> Vec<u8> {
        let mut b = Vec::new();
        header(&mut b, 0, 2 /* NLM_F_MULTI */, 1, AF_INET);
        for (kind, t) in [(CTA_TUPLE_ORIG, e.orig), (CTA_TUPLE_REPLY, e.reply)] {
            nested(&mut b, kind, |n| {
                nested(n, CTA_TUPLE_IP, |ip| {
                    let (IpAddr::V4(s), IpAddr::V4(d)) = (t.src, t.dst) else {
                        unreachable!()
                    };
                    attr(ip, CTA_IP_V4_SRC, &s.octets());
                    attr(ip, CTA_IP_V4_DST, &d.octets());
                });
                nested(n, CTA_TUPLE_PROTO, |p| {
                    attr(p, CTA_PROTO_NUM, &[t.proto]);
                    attr(p, CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
                    attr(p, CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
                });
            });
        }
        attr(&mut b, CTA_ID, &e.id.unwrap().to_be_bytes());
        finish(&mut b);
        b
    }

    #[test]
    fn dump_messages_decode_and_done_ends_the_dump() {
        let e = entry("10.244.1.2", "10.244.2.3", IPPROTO_TCP, 40000, 80);
        let mut buf = dump_message(&e);
        buf.extend(dump_message(&entry("10.0.0.1", "10.0.0.2", IPPROTO_UDP, 5, 53)));
        let mut done = Vec::new();
        header(&mut done, 0, 0, 1, AF_INET);
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        finish(&mut done);
        buf.extend(done);
        let r = parse(&buf);
        assert!(r.done);
        assert_eq!(r.malformed, 0);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[0], e);
    }

    #[test]
    fn delete_requests_name_the_tuple_and_id() {
        let e = entry("10.244.1.2", "10.244.2.3", IPPROTO_TCP, 40000, 80);
        let b = delete_request(9, &e);
        assert_eq!(u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(
            u16::from_ne_bytes(b[4..6].try_into().unwrap()),
            (SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        );
        // The original tuple decodes back from the request's attributes.
        let mut orig = None;
        let mut id = None;
        for nla in NlasIterator::new(&b[20..]) {
            let nla = nla.unwrap();
            match nla.kind() & NLA_TYPE_MASK {
                CTA_TUPLE_ORIG => orig = parse_tuple(nla.value()),
                CTA_ID => id = Some(u32::from_be_bytes(nla.value().try_into().unwrap())),
                _ => {}
            }
        }
        assert_eq!(orig, Some(e.orig));
        assert_eq!(id, Some(7));
    }

    fn ep(iface: &str, name: &str, ip: &str, ingress: &[&str]) -> Endpoint {
        Endpoint {
            namespace: "t".into(),
            pod: name.into(),
            interface: iface.into(),
            ips: vec![ip.into()],
            named_ports: vec![],
            ingress_policies: ingress.iter().map(|s| s.to_string()).collect(),
            egress_policies: vec![],
        }
    }

    /// server (10.244.1.3) admits TCP 80 only from 10.244.2.7.
    fn model() -> NodeModel {
        let inputs = PolicyInputs {
            spec: NodePolicySetSpec {
                endpoints: vec![
                    ep("cali00000000d01", "server", "10.244.1.3", &["t/only"]),
                    ep("cali00000000c01", "open", "10.244.1.4", &[]),
                ],
                policies: vec![CompiledPolicy {
                    name: "t/only".into(),
                    ingress: vec![Rule {
                        peers: Some(vec![Peer {
                            peer_set: Some("ps".into()),
                            ip_block: None,
                        }]),
                        ports: vec![PortMatch {
                            protocol: Protocol::TCP,
                            port: Some(80),
                            end_port: None,
                            named_port: None,
                            named_port_set: None,
                        }],
                    }],
                    egress: vec![],
                }],
            },
            peer_sets: BTreeMap::from([(
                "ps".to_string(),
                PeerSetSpec {
                    selector: PeerSelector::default(),
                    member_count: 1,
                    ips: vec!["10.244.2.7".into()],
                    ports: vec![],
                },
            )]),
            ..PolicyInputs::default()
        };
        build(&inputs)
    }

    #[test]
    fn only_entries_the_model_denies_are_cut() {
        let m = model();
        let host: BTreeSet<IpAddr> = ["192.168.0.10".parse().unwrap()].into();
        let sides = Sides::of(&m, host);
        let entries = [
            // denied: wrong peer, same port as the allowed one below
            entry("10.244.2.9", "10.244.1.3", IPPROTO_TCP, 40000, 80),
            // allowed: the peer set's member on port 80
            entry("10.244.2.7", "10.244.1.3", IPPROTO_TCP, 40001, 80),
            // denied: UDP is not in the rule
            entry("10.244.2.7", "10.244.1.3", IPPROTO_UDP, 40002, 80),
            // the host is never policed (kubelet probes)
            entry("192.168.0.10", "10.244.1.3", IPPROTO_TCP, 40003, 9999),
            // a pod that is not isolated
            entry("10.244.2.9", "10.244.1.4", IPPROTO_TCP, 40004, 22),
            // no local pod on either end: not ours to judge
            entry("10.244.2.9", "10.244.3.3", IPPROTO_TCP, 40005, 1),
            // ICMP is left alone
            entry("10.244.2.9", "10.244.1.3", 1, 0, 0),
        ];
        let cut: Vec<_> = denied(&m, &sides, &entries).into_iter().copied().collect();
        assert_eq!(cut, vec![entries[0], entries[2]]);
    }

    #[test]
    fn dnat_entries_are_judged_by_the_real_destination() {
        let m = model();
        let sides = Sides::of(&m, BTreeSet::new());
        // A Service address DNATed to the server: port 80 -> 8080 is denied,
        // ClusterIP:8080 -> server:80 from the allowed peer is allowed.
        let mut denied_e = entry("10.244.2.7", "10.96.0.10", IPPROTO_TCP, 40000, 80);
        denied_e.reply = tuple("10.244.1.3", "10.244.2.7", IPPROTO_TCP, 8080, 40000);
        let mut allowed_e = entry("10.244.2.7", "10.96.0.10", IPPROTO_TCP, 40001, 8080);
        allowed_e.reply = tuple("10.244.1.3", "10.244.2.7", IPPROTO_TCP, 80, 40001);
        let entries = [denied_e, allowed_e];
        let cut: Vec<_> = denied(&m, &sides, &entries).into_iter().copied().collect();
        assert_eq!(cut, vec![denied_e]);
    }

    #[test]
    fn nothing_is_scanned_without_isolation() {
        let mut m = model();
        assert!(can_deny(&m));
        for e in m.endpoints.values_mut() {
            e.ingress = crate::policy::model::Isolation::Open;
        }
        assert!(!can_deny(&m));
        m.enabled = false;
        let sides = Sides::of(&m, BTreeSet::new());
        let e = [entry("10.244.2.9", "10.244.1.3", IPPROTO_TCP, 1, 80)];
        assert!(denied(&m, &sides, &e).is_empty());
    }
}
