//! `spec.policy.established: Cut`: after a change is programmed, the
//! established flows the new policy denies are cut, so a deny also ends
//! TCP connections and UDP flows opened before it (otherwise the `ct state
//! established` accept in front of every policy keeps them flowing until
//! conntrack forgets them).
//!
//! Which flows go is decided by the pure evaluator ([`super::eval`]) against
//! the node model just programmed, the very semantics `kubectl canal
//! explain` reports, so an allowed flow is never cut: only entries with a
//! local pod's address on either end are candidates, each is judged as the
//! connection its original direction opened (after DNAT: the reply tuple's
//! source is the real destination), and only a denied one is cut.
//!
//! A cut sets [`CUT_MARK`] on the entry (ctnetlink, [`super::ctnetlink`]);
//! the filter chains drop marked flows in both directions before their
//! `established` accept. A plain delete is not enough: with
//! `nf_conntrack_tcp_loose` (the default), and always for UDP, the next
//! packet is picked up as a NEW flow in *its* direction, so a server's
//! next segment (say, a delayed ACK) would open the reverse connection,
//! which the server's egress may well allow, and the stream would carry on
//! on the new entry. A marked entry keeps the tuple claimed and dropped.
//! When policy allows a cut flow again, its entry is deleted (released):
//! the next packet is judged afresh. With `Keep`, nothing new is cut, and
//! flows cut earlier are still released when allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Instant;

use canal_crds::{EstablishedFlows, Protocol};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use tracing::{debug, info, warn};

use super::antispoof::Sources;
use super::ctnetlink::{AF_INET, AF_INET6, Conn, Entry, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use super::eval::{Connection, Side, evaluate};
use super::model::NodeModel;
pub use super::names::CUT_MARK;

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

/// What to do with one conntrack entry after a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Denied now: set [`CUT_MARK`], so both directions are dropped.
    Cut,
    /// Cut earlier, allowed again: delete it, so the flow's next packet is
    /// judged afresh (and, allowed, passes).
    Release,
}

/// What `model` asks for each of `entries`: `Cut` for a denied flow not yet
/// cut (only when `mode` is `Cut`), `Release` for a cut flow now allowed.
/// Allowed flows that were never cut are never touched.
pub fn decide<'a>(
    model: &NodeModel,
    mode: EstablishedFlows,
    sides: &Sides,
    entries: &'a [Entry],
) -> Vec<(&'a Entry, Action)> {
    let mut out = Vec::new();
    for e in entries {
        let cut = e.mark & CUT_MARK != 0;
        if !cut && (mode == EstablishedFlows::Keep || !sides.candidate(e)) {
            continue;
        }
        let allowed = match e.connection(sides) {
            Some(c) => evaluate(model, &c).allowed,
            // Not judged by policy (ICMP ...): never cut; released if it was.
            None => true,
        };
        match (allowed, cut) {
            (false, false) => out.push((e, Action::Cut)),
            (true, true) => out.push((e, Action::Release)),
            _ => {}
        }
    }
    out
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
    /// Entries cut (marked), by family (IPv4, IPv6).
    pub cut: [usize; 2],
    /// Cut entries deleted because policy allows them again.
    pub released: usize,
    /// Marks or deletes the kernel refused.
    pub failed: usize,
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
/// (None: the caller's) and applies [`decide`]. Blocking.
pub fn cut_blocking(
    netns: Option<&Path>,
    model: &NodeModel,
    mode: EstablishedFlows,
) -> Result<CutStats, CutError> {
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
        // A dump walks the kernel's whole conntrack hash (10-20 ms here):
        // no IPv6 pods, no IPv6 entry of ours.
        if family == AF_INET6 && !model.families.v6 {
            continue;
        }
        // Keep: only flows cut earlier can need anything (a release).
        let marked = (mode == EstablishedFlows::Keep).then_some((CUT_MARK, CUT_MARK));
        let entries = match conn.dump(family, marked) {
            Ok(e) => e,
            // No IPv6 conntrack on this node: nothing to cut there.
            Err(e) if family == AF_INET6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                continue;
            }
            Err(e) => return Err(CutError::Dump(e)),
        };
        stats.scanned += entries.len();
        for (e, action) in decide(model, mode, &sides, &entries) {
            let done = match action {
                Action::Cut => conn.mark(e, CUT_MARK, CUT_MARK),
                Action::Release => conn.delete(e),
            };
            match (done, action) {
                (Ok(true), Action::Cut) => stats.cut[usize::from(family == AF_INET6)] += 1,
                (Ok(true), Action::Release) => stats.released += 1,
                (Ok(false), _) => stats.failed += 1,
                (Err(err), _) => {
                    debug!(entry = ?e, ?action, "changing a conntrack entry: {err}");
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
    /// Entries cut because policy now denies them.
    pub entries: IntCounterVec,
    /// Cut entries deleted because policy allows their flow again.
    pub released: prometheus::IntCounter,
    /// Cuts or deletes that failed, by stage.
    pub failures: IntCounterVec,
    /// Duration of a cut pass (dump, evaluation, deletes).
    pub duration: Histogram,
}

/// The process's cut metrics (registered on the agent's registry by
/// [`register`]; shared by every enforcer of the process).
pub static METRICS: LazyLock<CutMetrics> = LazyLock::new(|| {
    CutMetrics {
    entries: IntCounterVec::new(
        Opts::new(
            "canal_policy_conntrack_cut_entries_total",
            "Established flows (conntrack entries) cut because a programmed policy change denies them (spec.policy.established: Cut), by family.",
        ),
        &["family"],
    )
    .unwrap_or_else(|e| unreachable!("static metric options are valid: {e}")),
    released: prometheus::IntCounter::new(
        "canal_policy_conntrack_released_entries_total",
        "Cut conntrack entries deleted because policy allows their flow again (its next packet is judged afresh).",
    )
    .unwrap_or_else(|e| unreachable!("static metric options are valid: {e}")),
    failures: IntCounterVec::new(
        Opts::new(
            "canal_policy_conntrack_cut_failures_total",
            "Cut passes or single conntrack changes that failed, by stage (open, dump, change).",
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
}
});

/// Registers the cut metrics on `registry`.
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    let m = &*METRICS;
    registry.register(Box::new(m.entries.clone()))?;
    registry.register(Box::new(m.released.clone()))?;
    registry.register(Box::new(m.failures.clone()))?;
    registry.register(Box::new(m.duration.clone()))?;
    for f in ["IPv4", "IPv6"] {
        m.entries.with_label_values(&[f]);
    }
    for s in ["open", "dump", "change"] {
        m.failures.with_label_values(&[s]);
    }
    Ok(())
}

/// Cuts the flows `model` denies after it was programmed (and releases
/// cut flows it allows again); remembers the model so an unchanged one is
/// not scanned again.
#[derive(Debug, Default)]
pub struct Established {
    last: Option<(NodeModel, EstablishedFlows)>,
    /// With `Keep`, a pass found no cut entry and nothing was cut since:
    /// later `Keep` changes need no pass (after a start, marks of an
    /// earlier run may exist, so the first pass always runs).
    none_cut: bool,
}

impl Established {
    /// Runs after every successfully programmed sync. Failures are
    /// counted and logged, never fatal: the rules are in place either way,
    /// and the next sync tries again.
    pub async fn after_apply(
        &mut self,
        model: &NodeModel,
        mode: EstablishedFlows,
        netns: Option<&Path>,
    ) -> Option<CutStats> {
        if self
            .last
            .as_ref()
            .is_some_and(|(m, was)| m == model && *was == mode)
        {
            return None;
        }
        self.last = Some((model.clone(), mode));
        if mode == EstablishedFlows::Keep && self.none_cut {
            return None;
        }
        let started = Instant::now();
        let (m, ns) = (model.clone(), netns.map(Path::to_path_buf));
        let joined =
            tokio::task::spawn_blocking(move || cut_blocking(ns.as_deref(), &m, mode)).await;
        METRICS.duration.observe(started.elapsed().as_secs_f64());
        let result = match joined {
            Ok(r) => r,
            Err(e) => Err(CutError::Dump(io::Error::other(e.to_string()))),
        };
        match result {
            Ok(stats) => {
                let [v4, v6] = stats.cut;
                // Keep dumps only cut entries: none left, none to come.
                self.none_cut = mode == EstablishedFlows::Keep
                    && stats.failed == 0
                    && stats.scanned == stats.released;
                METRICS
                    .entries
                    .with_label_values(&["IPv4"])
                    .inc_by(v4 as u64);
                METRICS
                    .entries
                    .with_label_values(&["IPv6"])
                    .inc_by(v6 as u64);
                METRICS.released.inc_by(stats.released as u64);
                if v4 + v6 + stats.released > 0 {
                    info!(
                        cut = v4 + v6,
                        released = stats.released,
                        scanned = stats.scanned,
                        failed = stats.failed,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "established flows: cut what the new policy denies"
                    );
                }
                if stats.failed > 0 {
                    warn!(
                        failed = stats.failed,
                        "some conntrack entries could not be changed"
                    );
                    METRICS
                        .failures
                        .with_label_values(&["change"])
                        .inc_by(stats.failed as u64);
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
    use crate::policy::ctnetlink::Tuple;
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
            mark: 0,
        }
    }

    fn cuts(m: &NodeModel, mode: EstablishedFlows, s: &Sides, e: &[Entry]) -> Vec<(Entry, Action)> {
        decide(m, mode, s, e)
            .into_iter()
            .map(|(e, a)| (*e, a))
            .collect()
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
        let want = vec![(entries[0], Action::Cut), (entries[2], Action::Cut)];
        assert_eq!(cuts(&m, EstablishedFlows::Cut, &sides, &entries), want);
        assert!(cuts(&m, EstablishedFlows::Keep, &sides, &entries).is_empty());
    }

    #[test]
    fn cut_flows_are_left_while_denied_and_released_once_allowed() {
        let m = model();
        let sides = Sides::of(&m, BTreeSet::new());
        let mut denied_e = entry("10.244.2.9", "10.244.1.3", IPPROTO_TCP, 40000, 80);
        denied_e.mark = CUT_MARK;
        let mut allowed_e = entry("10.244.2.7", "10.244.1.3", IPPROTO_TCP, 40001, 80);
        allowed_e.mark = CUT_MARK | 0x5;
        // A foreign mark bit alone is not ours.
        let mut foreign = entry("10.244.2.7", "10.244.1.3", IPPROTO_TCP, 40002, 80);
        foreign.mark = 0x5;
        let entries = [denied_e, allowed_e, foreign];
        for mode in [EstablishedFlows::Cut, EstablishedFlows::Keep] {
            assert_eq!(
                cuts(&m, mode, &sides, &entries),
                vec![(allowed_e, Action::Release)],
                "{mode:?}"
            );
        }
        // Policy disabled: everything cut is released.
        let mut off = m.clone();
        off.enabled = false;
        assert_eq!(
            cuts(&off, EstablishedFlows::Cut, &sides, &entries),
            vec![(denied_e, Action::Release), (allowed_e, Action::Release)]
        );
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
        assert_eq!(
            cuts(&m, EstablishedFlows::Cut, &sides, &entries),
            vec![(denied_e, Action::Cut)]
        );
    }
}
