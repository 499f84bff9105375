//! Denied-flow counters: the packets each local endpoint's "no policy
//! allowed" drop rule dropped, read from the kernel's own rule counters
//! (iptables rule counters via `iptables-save -c`, the nftables rule's
//! `counter`), as `canal_policy_denied_packets_total{endpoint,direction}`
//! and, for every policy isolating that endpoint in that direction,
//! `canal_policy_denied_by_policy_packets_total{policy,direction}`.
//!
//! Labels are bounded by the node: endpoints are this node's pods (the
//! kubelet's max-pods), policies those isolating them; each metric also
//! keeps at most [`MAX_SERIES`] label values (the rest is summed under
//! `_other`), and the series of an endpoint or policy that left the node
//! are removed.
//!
//! The drop rules sit behind the `ct state established,related accept`,
//! so every packet they count opened (or retried) a connection policy
//! denies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;
use tracing::debug;

use super::enforcer::Plane;
use super::exec::Exec;
use super::iptables::{Tools, detect_backend};
use super::model::{Direction, Family, Isolation, NodeModel};
use super::names;
use super::nft::libnft::Runner;
use super::nft::render::{TABLE, endpoint_chain_name};
use super::nft::state as nft_state;
use super::state::rule_packet_counts;

/// Most label values per metric (beyond: `_other`).
pub const MAX_SERIES: usize = 256;
/// The label value of everything beyond [`MAX_SERIES`].
pub const OTHER: &str = "_other";
/// How often the kernel counters are read.
pub const READ_INTERVAL: Duration = Duration::from_secs(5);

/// What one drop rule stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `namespace/name` of the pod (or [`OTHER`] past the cap).
    pub endpoint: String,
    /// `ingress` / `egress`.
    pub direction: &'static str,
    /// The policies isolating it in that direction (each capped too).
    pub policies: Vec<String>,
    /// The nftables chain holding the rule (nftables reads per chain).
    pub chain: String,
}

/// The drop rules of `model` on `plane`, by rule hash.
pub fn targets(model: &NodeModel, plane: Plane) -> BTreeMap<String, Target> {
    let mut out = BTreeMap::new();
    if !model.enabled {
        return out;
    }
    let mut endpoints = Capped::default();
    let mut policies = Capped::default();
    for (iface, ep) in &model.endpoints {
        for dir in [Direction::Ingress, Direction::Egress] {
            let Isolation::By(list) = ep.isolation(dir) else {
                continue;
            };
            let (chain, hash) = match plane {
                Plane::IpTables => {
                    let name = match dir {
                        Direction::Ingress => names::to_endpoint_chain(iface),
                        Direction::Egress => names::from_endpoint_chain(iface),
                    };
                    let log = model.log_denied.then_some(iface.as_str());
                    let c = super::render::endpoint_chain(&name, ep.isolation(dir), dir, log);
                    (name, c.rules.last().map(|r| r.hash.clone()))
                }
                Plane::NfTables => {
                    let name = endpoint_chain_name(iface, dir);
                    let log = model.log_denied.then_some(iface.as_str());
                    let c = super::nft::render::endpoint_chain(&name, ep.isolation(dir), dir, log);
                    (name, c.rules.last().map(|r| r.hash.clone()))
                }
            };
            let Some(hash) = hash else { continue };
            out.insert(
                hash,
                Target {
                    endpoint: endpoints.label(&ep.pod),
                    direction: dir.as_str(),
                    policies: list.iter().map(|p| policies.label(p)).collect(),
                    chain,
                },
            );
        }
    }
    out
}

/// Hands out at most [`MAX_SERIES`] distinct labels, then [`OTHER`].
#[derive(Default)]
struct Capped(BTreeSet<String>);

impl Capped {
    fn label(&mut self, v: &str) -> String {
        if self.0.contains(v) || self.0.len() < MAX_SERIES {
            self.0.insert(v.to_string());
            v.to_string()
        } else {
            OTHER.to_string()
        }
    }
}

/// Packet counts by (family index, rule hash) -> what to add to which series.
#[derive(Debug, Default)]
pub struct Tally {
    seen: BTreeMap<(u8, String), u64>,
}

/// Additions to the metrics from one read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Deltas {
    /// By (endpoint, direction).
    pub endpoints: BTreeMap<(String, &'static str), u64>,
    /// By (policy, direction).
    pub policies: BTreeMap<(String, &'static str), u64>,
}

impl Tally {
    /// What counted since the last read (a rule rewritten meanwhile starts
    /// again from zero, so a smaller count is all new). `counts` is by
    /// family index and rule hash.
    pub fn feed(
        &mut self,
        targets: &BTreeMap<String, Target>,
        counts: &BTreeMap<(u8, String), u64>,
    ) -> Deltas {
        let mut d = Deltas::default();
        for (key, &now) in counts {
            let Some(t) = targets.get(&key.1) else {
                continue;
            };
            let before = self.seen.insert(key.clone(), now).unwrap_or(0);
            let delta = if now >= before { now - before } else { now };
            if delta == 0 {
                continue;
            }
            *d.endpoints
                .entry((t.endpoint.clone(), t.direction))
                .or_default() += delta;
            for p in &t.policies {
                *d.policies.entry((p.clone(), t.direction)).or_default() += delta;
            }
        }
        self.seen.retain(|k, _| counts.contains_key(k));
        d
    }
}

/// The denied-flow metrics of the process (registered on the agent's
/// registry by [`register`]).
#[derive(Clone, Debug)]
pub struct DeniedMetrics {
    /// By endpoint and direction.
    pub packets: IntCounterVec,
    /// By isolating policy and direction.
    pub by_policy: IntCounterVec,
    /// Failed reads of the kernel counters.
    pub read_errors: IntCounterVec,
}

/// The process's denied-flow metrics.
pub static METRICS: LazyLock<DeniedMetrics> = LazyLock::new(|| {
    let vec = |name: &str, help: &str, labels: &[&str]| {
        IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| unreachable!("static metric options are valid: {e}"))
    };
    DeniedMetrics {
        packets: vec(
            "canal_policy_denied_packets_total",
            "Packets of new connections NetworkPolicy denied at a local pod, by endpoint (namespace/name; at most 256, the rest as _other) and direction; from the kernel's drop-rule counters.",
            &["endpoint", "direction"],
        ),
        by_policy: vec(
            "canal_policy_denied_by_policy_packets_total",
            "Packets denied at local pods that a policy isolates, by policy (namespace/name; at most 256, the rest as _other) and direction: a packet counts for every policy isolating its pod in that direction.",
            &["policy", "direction"],
        ),
        read_errors: vec(
            "canal_policy_denied_counter_read_errors_total",
            "Failed reads of the denied-packet counters from the kernel, by dataplane.",
            &["dataplane"],
        ),
    }
});

/// Registers the denied-flow metrics on `registry`.
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    let m = &*METRICS;
    registry.register(Box::new(m.packets.clone()))?;
    registry.register(Box::new(m.by_policy.clone()))?;
    registry.register(Box::new(m.read_errors.clone()))?;
    super::flowlog::register(registry)?;
    for d in super::metrics::DATAPLANES {
        m.read_errors.with_label_values(&[d]);
    }
    // The overflow series exist from the start (0 until the cap is passed),
    // so the metrics are served before the first isolated pod.
    for dir in ["ingress", "egress"] {
        m.packets.with_label_values(&[OTHER, dir]);
        m.by_policy.with_label_values(&[OTHER, dir]);
    }
    Ok(())
}

/// What the reader reads: the programmed plane and its drop rules.
#[derive(Debug)]
pub struct Snapshot {
    /// The dataplane programmed.
    pub plane: Plane,
    /// The families programmed.
    pub families: super::model::Families,
    /// The drop rules.
    pub targets: BTreeMap<String, Target>,
}

/// The background reader of one enforcer: started with the first
/// programmed sync, fed a new [`Snapshot`] after each, stopped when
/// dropped.
#[derive(Debug, Default)]
pub struct DeniedCounters {
    tx: Option<watch::Sender<Option<Arc<Snapshot>>>>,
    /// What the drop rules of the last snapshot were derived from: a sync
    /// that changed only PeerSet members or policy rules keeps them.
    last: Option<TargetInputs>,
}

/// The parts of a model [`targets`] reads.
#[derive(Debug)]
struct TargetInputs {
    plane: Plane,
    enabled: bool,
    log_denied: bool,
    families: super::model::Families,
    endpoints: BTreeMap<String, super::model::EndpointModel>,
}

impl DeniedCounters {
    /// Points the reader at what was just programmed.
    pub fn programmed(&mut self, model: &NodeModel, plane: Plane, exec: &Exec) {
        // Compared in place: the endpoints are copied only when they changed.
        let unchanged = self.tx.is_some()
            && self.last.as_ref().is_some_and(|l| {
                l.plane == plane
                    && l.enabled == model.enabled
                    && l.log_denied == model.log_denied
                    && l.families == model.families
                    && l.endpoints == model.endpoints
            });
        if unchanged {
            return;
        }
        self.last = Some(TargetInputs {
            plane,
            enabled: model.enabled,
            log_denied: model.log_denied,
            families: model.families,
            endpoints: model.endpoints.clone(),
        });
        let snap = Arc::new(Snapshot {
            plane,
            families: model.families,
            targets: targets(model, plane),
        });
        match &self.tx {
            Some(tx) => {
                let _ = tx.send(Some(snap));
            }
            None => {
                let (tx, rx) = watch::channel(Some(snap));
                tokio::spawn(read_loop(rx, exec.clone()));
                self.tx = Some(tx);
            }
        }
    }
}

async fn read_loop(mut rx: watch::Receiver<Option<Arc<Snapshot>>>, exec: Exec) {
    let mut tally = Tally::default();
    let mut live: BTreeSet<(String, &'static str)> = BTreeSet::new();
    let mut live_policies: BTreeSet<(String, &'static str)> = BTreeSet::new();
    let mut tools: Option<Tools> = None;
    let mut nft: Option<Runner> = None;
    let mut tick = tokio::time::interval(READ_INTERVAL);
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(snap) = rx.borrow_and_update().clone() else {
            continue;
        };
        // Series of endpoints and policies no longer here go.
        let want: BTreeSet<_> = snap
            .targets
            .values()
            .map(|t| (t.endpoint.clone(), t.direction))
            .collect();
        let want_p: BTreeSet<_> = snap
            .targets
            .values()
            .flat_map(|t| t.policies.iter().map(|p| (p.clone(), t.direction)))
            .collect();
        for (e, d) in live.difference(&want) {
            if e != OTHER {
                let _ = METRICS.packets.remove_label_values(&[e.as_str(), d]);
            }
        }
        for (p, d) in live_policies.difference(&want_p) {
            if p == OTHER {
                continue;
            }
            let _ = METRICS.by_policy.remove_label_values(&[p.as_str(), d]);
        }
        // Every isolated endpoint and isolating policy shows, at 0 until a deny.
        for (e, d) in want.difference(&live) {
            METRICS.packets.with_label_values(&[e.as_str(), d]);
        }
        for (p, d) in want_p.difference(&live_policies) {
            METRICS.by_policy.with_label_values(&[p.as_str(), d]);
        }
        live = want;
        live_policies = want_p;
        if snap.targets.is_empty() {
            continue;
        }
        let counts = match snap.plane {
            Plane::IpTables => {
                if tools.is_none() {
                    tools = Some(Tools::for_backend(detect_backend(&exec).await));
                }
                let t = tools.as_ref().unwrap_or_else(|| unreachable!("set above"));
                iptables_counts(&exec, t, snap.families).await
            }
            Plane::NfTables => {
                let r = nft.get_or_insert_with(|| Runner::new(&exec));
                nft_counts(r, &snap.targets).await
            }
        };
        let counts = match counts {
            Ok(c) => c,
            Err(e) => {
                debug!("reading the denied-packet counters: {e}");
                METRICS
                    .read_errors
                    .with_label_values(&[snap.plane.as_str()])
                    .inc();
                continue;
            }
        };
        let d = tally.feed(&snap.targets, &counts);
        for ((e, dir), n) in d.endpoints {
            METRICS.packets.with_label_values(&[&e, dir]).inc_by(n);
        }
        for ((p, dir), n) in d.policies {
            METRICS.by_policy.with_label_values(&[&p, dir]).inc_by(n);
        }
    }
}

async fn iptables_counts(
    exec: &Exec,
    tools: &Tools,
    families: super::model::Families,
) -> Result<BTreeMap<(u8, String), u64>, String> {
    let mut out = BTreeMap::new();
    for (i, f) in [Family::V4, Family::V6].into_iter().enumerate() {
        if !families.has(f) {
            continue;
        }
        let save = match f {
            Family::V4 => &tools.iptables_save,
            Family::V6 => &tools.ip6tables_save,
        };
        let text = exec
            .run(save, &["-c", "-t", "filter"], None, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        for (h, n) in rule_packet_counts(&text) {
            out.insert((i as u8, h), n);
        }
    }
    Ok(out)
}

async fn nft_counts(
    runner: &Runner,
    targets: &BTreeMap<String, Target>,
) -> Result<BTreeMap<(u8, String), u64>, String> {
    let chains: BTreeSet<&str> = targets.values().map(|t| t.chain.as_str()).collect();
    let mut out = BTreeMap::new();
    for chain in chains {
        let cmd = format!("list chain inet {TABLE} {chain}");
        let json = runner.list_json(&cmd).await.map_err(|e| e.to_string())?;
        for (h, n) in nft_state::rule_packet_counts(&json) {
            out.insert((0, h), n);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ep: &str, dir: &'static str, policies: &[&str]) -> Target {
        Target {
            endpoint: ep.into(),
            direction: dir,
            policies: policies.iter().map(|s| s.to_string()).collect(),
            chain: String::new(),
        }
    }

    #[test]
    fn deltas_go_to_the_endpoint_and_every_isolating_policy() {
        let targets = BTreeMap::from([
            ("h1".to_string(), target("x/a", "ingress", &["x/p", "x/q"])),
            ("h2".to_string(), target("x/b", "egress", &["x/p"])),
        ]);
        let mut t = Tally::default();
        let c = |a: u64, b: u64, v6: u64| {
            BTreeMap::from([
                ((0, "h1".to_string()), a),
                ((1, "h1".to_string()), v6),
                ((0, "h2".to_string()), b),
                ((0, "foreign".to_string()), 99),
            ])
        };
        let d = t.feed(&targets, &c(3, 0, 1));
        assert_eq!(d.endpoints[&("x/a".to_string(), "ingress")], 4);
        assert!(!d.endpoints.contains_key(&("x/b".to_string(), "egress")));
        assert_eq!(d.policies[&("x/q".to_string(), "ingress")], 4);
        let d = t.feed(&targets, &c(5, 2, 1));
        assert_eq!(d.endpoints[&("x/a".to_string(), "ingress")], 2);
        assert_eq!(d.policies[&("x/p".to_string(), "egress")], 2);
        // A rewritten rule restarts from zero: what it shows is new.
        let d = t.feed(&targets, &c(1, 2, 1));
        assert_eq!(d.endpoints[&("x/a".to_string(), "ingress")], 1);
        assert_eq!(d, {
            let mut want = Deltas::default();
            want.endpoints.insert(("x/a".into(), "ingress"), 1);
            want.policies.insert(("x/p".into(), "ingress"), 1);
            want.policies.insert(("x/q".into(), "ingress"), 1);
            want
        });
    }

    /// The golden test's richest input, with the log on or off.
    fn web_mixed(log: bool) -> NodeModel {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Case {
            spec: canal_crds::NodePolicySetSpec,
            #[serde(default)]
            peer_sets: BTreeMap<String, canal_crds::PeerSetSpec>,
        }
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/web-mixed.yaml");
        let c: Case = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut inputs = crate::policy::render::PolicyInputs {
            spec: c.spec,
            peer_sets: c.peer_sets,
            ..Default::default()
        };
        inputs.config.log_denied = log;
        crate::policy::model::build(&inputs)
    }

    #[test]
    fn targets_are_the_rendered_drop_rules_of_isolated_pods() {
        for log in [false, true] {
            let model = web_mixed(log);
            let isolated: usize = model
                .endpoints
                .values()
                .map(|e| {
                    usize::from(matches!(e.ingress, Isolation::By(_)))
                        + usize::from(matches!(e.egress, Isolation::By(_)))
                })
                .sum();
            assert!(isolated >= 2);
            let ipt =
                crate::policy::render::render_model(&model, Family::V4, &mut Default::default());
            let t = targets(&model, Plane::IpTables);
            assert_eq!(t.len(), isolated);
            for (hash, target) in &t {
                let rules = &ipt.chains[&target.chain].rules;
                let last = rules.last().unwrap();
                assert_eq!(&last.hash, hash);
                assert_eq!(last.spec, "-j DROP");
                let logs = rules.iter().any(|r| r.spec.contains("NFLOG"));
                assert_eq!(logs, log, "{}", target.chain);
            }
            let nft = crate::policy::nft::render::render_with(&model, &mut Default::default());
            let t = targets(&model, Plane::NfTables);
            assert_eq!(t.len(), isolated);
            for (hash, target) in &t {
                let rules = &nft.chains[&target.chain].rules;
                let last = rules.last().unwrap();
                assert_eq!(&last.hash, hash);
                assert_eq!(last.spec, "counter drop");
                let logs = rules
                    .iter()
                    .any(|r| r.spec.contains("log prefix \"canal-deny:"));
                assert_eq!(logs, log, "{}", target.chain);
                assert!(target.endpoint.contains('/') && !target.policies.is_empty());
            }
        }
    }

    #[test]
    fn targets_are_re_derived_only_when_their_inputs_change() {
        // A reader channel of the test's own: no read loop is started.
        let (tx, mut rx) = watch::channel(None);
        let mut c = DeniedCounters {
            tx: Some(tx),
            last: None,
        };
        let exec = Exec::host();
        let mut model = web_mixed(false);
        c.programmed(&model, Plane::NfTables, &exec);
        assert!(rx.has_changed().unwrap(), "the first sync sends targets");
        let first = rx.borrow_and_update().clone().unwrap();

        // PeerSet members or policy rules: the drop rules are the same.
        model.policies.clear();
        c.programmed(&model, Plane::NfTables, &exec);
        assert!(
            !rx.has_changed().unwrap(),
            "unchanged endpoints keep the targets"
        );

        // Each input the targets come from sends new ones.
        model.log_denied = true;
        c.programmed(&model, Plane::NfTables, &exec);
        assert!(rx.has_changed().unwrap(), "logging changed");
        rx.borrow_and_update();
        c.programmed(&model, Plane::IpTables, &exec);
        assert!(rx.has_changed().unwrap(), "dataplane changed");
        rx.borrow_and_update();
        let gone = model.endpoints.keys().next().cloned().unwrap();
        model.endpoints.remove(&gone);
        c.programmed(&model, Plane::IpTables, &exec);
        assert!(rx.has_changed().unwrap(), "an endpoint went");
        let last = rx.borrow_and_update().clone().unwrap();
        assert!(
            last.targets.len() < first.targets.len(),
            "its drop rules went too"
        );
    }

    #[test]
    fn labels_are_capped() {
        let mut c = Capped::default();
        for i in 0..MAX_SERIES {
            assert_eq!(c.label(&format!("n/{i}")), format!("n/{i}"));
        }
        assert_eq!(c.label("n/late"), OTHER);
        assert_eq!(c.label("n/0"), "n/0");
    }
}

/// What the enforcer runs after every programmed sync (its one hook):
/// the conntrack cut of `spec.policy.established`, the counters' reader
/// and the denied-connection log of `spec.policy.logDenied`.
#[derive(Debug, Default)]
pub struct Visibility {
    established: super::conntrack::Established,
    counters: DeniedCounters,
    log: super::flowlog::DeniedLog,
}

impl Visibility {
    /// After `model` was programmed on `plane`: cut what it denies, and
    /// point the counter reader at its drop rules.
    pub async fn after_apply(
        &mut self,
        model: &NodeModel,
        plane: Plane,
        established: canal_crds::EstablishedFlows,
        exec: &Exec,
    ) {
        self.established
            .after_apply(model, established, exec.netns())
            .await;
        self.counters.programmed(model, plane, exec);
        self.log.programmed(model, exec.netns());
    }
}
