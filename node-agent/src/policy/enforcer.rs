//! The applier and the seam between policy and its dataplanes: one
//! level-triggered sync builds the neutral model ([`super::model`]) once,
//! renders it for the chosen dataplane (iptables + ipset per family,
//! [`super::render`] + [`super::iptables`]; or canal's nftables table,
//! [`super::nft`]), diffs it against the state applied last (or read from
//! the kernel on start, drift checks and after a failure) and applies only
//! the difference. Nothing is ever flushed wholesale, so an agent restart
//! leaves enforcement in place.
//!
//! Switching dataplanes (`spec.policy.dataplane`) programs the new one
//! completely before removing every trace of the old one, in the same
//! sync: meanwhile packets pass both, each of which drops what policy
//! denies (conntrack state is shared, so established connections carry on).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{Instrument, debug, info, warn};

use super::exec::{Exec, ExecError};
use super::handshake::{Handshake, HandshakeError};
use super::iptables::{IptablesPlane, Tools, detect_backend};
use super::metrics::PolicyMetrics;
use super::model::{DataplaneChoice, Families, Family, ModelCache, NodeModel, build_with};
use super::nft::render::{NftCache, PREROUTING};
use super::nft::{NftError, NftPlanStats, NftRuleset, NftTable, Runner};
use super::plan::PlanStats;
use super::render::{FamilyCache, PolicyInputs, Warning, render_model};
use super::ruleset::Ruleset;
use super::watch::Backend;

/// A sync that failed after its retries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `iptables-save` or `ipset save` failed.
    #[error("reading the kernel's policy state: {0}")]
    ReadState(#[source] ExecError),
    /// `ipset restore` failed.
    #[error("programming ipsets ({stage} batch): {source}")]
    IpsetRestore {
        stage: &'static str,
        #[source]
        source: ExecError,
    },
    /// `iptables-restore` failed.
    #[error("programming the filter table: {0}")]
    IptablesRestore(#[source] ExecError),
    /// An nftables transaction or listing failed.
    #[error("programming canal's nftables table: {0}")]
    Nft(#[source] NftError),
    /// A run-dir handshake file could not be written or removed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

impl Error {
    /// A bounded label value for metrics and status reasons.
    pub fn category(&self) -> &'static str {
        let exec = match self {
            Error::ReadState(e)
            | Error::IpsetRestore { source: e, .. }
            | Error::IptablesRestore(e) => e,
            Error::Nft(e) if e.is_missing() => return "tool_missing",
            Error::Nft(_) => return "nft",
            Error::Handshake(_) => return "handshake_files",
        };
        if matches!(exec, ExecError::Spawn { .. }) {
            return "tool_missing";
        }
        match self {
            Error::ReadState(_) => "read_state",
            Error::IpsetRestore { .. } => "ipset_restore",
            _ => "iptables_restore",
        }
    }
}

/// The dataplane that programs policy and masquerade on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plane {
    /// iptables + ipset.
    IpTables,
    /// canal's nftables table.
    NfTables,
}

impl Plane {
    /// `iptables` / `nftables` (logs, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::IpTables => "iptables",
            Plane::NfTables => "nftables",
        }
    }
}

/// What a node offers, for [`resolve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSupport {
    /// nftables works (library or program, and the kernel's inet tables).
    pub nftables: bool,
    /// The node's iptables backend (kube-proxy's iptables-wrapper rule).
    pub iptables_backend: Backend,
}

/// The dataplane for `choice` on a node with `support`: `Auto` is
/// nftables unless the node lacks it or is committed to iptables-legacy.
pub fn resolve(choice: DataplaneChoice, support: NodeSupport) -> Plane {
    match choice {
        DataplaneChoice::IpTables => Plane::IpTables,
        DataplaneChoice::NfTables => Plane::NfTables,
        DataplaneChoice::Auto if support.nftables && support.iptables_backend == Backend::Nft => {
            Plane::NfTables
        }
        DataplaneChoice::Auto => Plane::IpTables,
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// The dataplane programmed.
    pub dataplane: Option<Plane>,
    /// The kernel state was read first (start, drift check, after a failure).
    pub full: bool,
    /// Kernel changes were executed (false: the kernel already matched).
    pub applied: bool,
    /// Attempts needed (1 unless a transaction failed and was retried).
    pub attempts: u32,
    /// What the applied plan changed.
    pub plan: PlanStats,
    /// Chains the applied plan wrote (created or rewritten).
    pub written_chains: Vec<String>,
    /// The other dataplane held canal state, which this sync removed.
    pub removed_other: bool,
    /// Rules programmed.
    pub rules: usize,
    /// Sets programmed.
    pub sets: usize,
    /// Set members programmed.
    pub set_members: usize,
    /// Endpoints programmed.
    pub endpoints: usize,
    /// Input parts skipped by the renderer.
    pub warnings: Vec<Warning>,
    /// Wall time of the sync.
    pub duration: Duration,
    /// Part of it spent building the model and rendering.
    pub render_time: Duration,
    /// Part of it spent diffing against the known state.
    pub plan_time: Duration,
    /// Part of it spent in the kernel and its tools (restores, transactions, reads).
    pub restore_time: Duration,
}

/// Retry behaviour for failed restores.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Attempts per sync, the first included.
    pub attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// The rendered form of a sync for one dataplane.
#[derive(Clone, Debug)]
enum Rendered {
    IpTables { v4: Ruleset, v6: Option<Ruleset> },
    NfTables(NftRuleset),
}

#[derive(Clone, Debug)]
struct Desired {
    rendered: Rendered,
    families: Families,
    generation: Option<i64>,
    /// canal-cni must wait for endpoint files (policy is enabled).
    handshake: bool,
    endpoints: std::collections::BTreeSet<String>,
    warnings: Vec<Warning>,
    rules: usize,
    sets: usize,
    set_members: usize,
}

impl Desired {
    fn plane(&self) -> Plane {
        match self.rendered {
            Rendered::IpTables { .. } => Plane::IpTables,
            Rendered::NfTables(_) => Plane::NfTables,
        }
    }
}

/// Programs NetworkPolicy into the node's kernel. Owned by the agent's sync
/// loop; every method takes `&mut self`, so syncs never overlap.
#[derive(Debug)]
pub struct PolicyEnforcer {
    exec: Exec,
    /// Tools named by the caller (tests); None: the node's backend's.
    tools: Option<Tools>,
    retry: Retry,
    handshake: Handshake,
    metrics: PolicyMetrics,
    model_cache: ModelCache,
    ipt_cache: [FamilyCache; 2],
    nft_cache: NftCache,
    iptables: Option<IptablesPlane>,
    nft: Option<NftTable>,
    support: Option<NodeSupport>,
    /// The dataplane of the last successful sync, and whether the other
    /// one is known to hold nothing of canal's.
    active: Option<Plane>,
    other_clean: bool,
    /// The last desired state, for drift checks.
    last: Option<Desired>,
    /// Packet counts of the anti-spoofing drop rules at the last read, by hash.
    spoof_seen: BTreeMap<String, u64>,
    /// `nft -f` per transaction instead of the library (benchmarks).
    nft_process: bool,
    /// Conntrack cut and denied-flow counters (denied.rs, conntrack.rs).
    visibility: super::denied::Visibility,
}

impl PolicyEnforcer {
    /// An enforcer for this node's kernel, writing handshake files under `run_dir`.
    pub fn new(run_dir: &Path, metrics: PolicyMetrics) -> PolicyEnforcer {
        PolicyEnforcer {
            exec: Exec::host(),
            tools: None,
            retry: Retry::default(),
            handshake: Handshake::new(run_dir),
            metrics,
            model_cache: ModelCache::default(),
            ipt_cache: Default::default(),
            nft_cache: NftCache::default(),
            iptables: None,
            nft: None,
            support: None,
            active: None,
            other_clean: false,
            last: None,
            spoof_seen: BTreeMap::new(),
            nft_process: false,
            visibility: Default::default(),
        }
    }

    /// Runs the tools inside another network namespace (tests, benchmarks).
    pub fn with_exec(mut self, exec: Exec) -> PolicyEnforcer {
        self.exec = exec;
        self
    }

    /// Overrides the retry policy.
    pub fn with_retry(mut self, retry: Retry) -> PolicyEnforcer {
        self.retry = retry;
        self
    }

    /// Overrides the iptables tool names (no backend detection).
    pub fn with_tools(mut self, tools: Tools) -> PolicyEnforcer {
        self.tools = Some(tools);
        self
    }

    /// Runs `nft -f -` per transaction instead of libnftables (benchmarks).
    pub fn with_nft_process(mut self) -> PolicyEnforcer {
        self.nft_process = true;
        self
    }

    /// The dataplane of the last successful sync.
    pub fn active(&self) -> Option<Plane> {
        self.active
    }

    /// nftables transactions sent as element batches (tests, benchmarks).
    pub fn nft_batches(&self) -> u64 {
        self.nft.as_ref().map_or(0, NftTable::batches)
    }

    /// What the node supports (probed once: nftables, the iptables backend).
    pub async fn support(&mut self) -> NodeSupport {
        if let Some(s) = self.support {
            return s;
        }
        let iptables_backend = match &self.tools {
            // Tools named by the caller: their backend.
            Some(t) => {
                let version = self
                    .exec
                    .run(
                        &t.iptables_save,
                        &["--version"],
                        None,
                        Duration::from_secs(10),
                    )
                    .await;
                version.map_or(Backend::Nft, |v| super::watch::backend_of(&v))
            }
            None => detect_backend(&self.exec).await,
        };
        let nftables = self.nft_table().list_json_ok().await;
        let s = NodeSupport {
            nftables,
            iptables_backend,
        };
        info!(
            nftables = s.nftables,
            iptables_backend = ?s.iptables_backend,
            nft_runner = self.nft_table().runner().kind(),
            "policy dataplanes available on this node"
        );
        self.support = Some(s);
        s
    }

    async fn iptables_plane(&mut self) -> &mut IptablesPlane {
        let tools = match (&self.iptables, &self.tools) {
            (Some(_), _) => None,
            (None, Some(t)) => Some(t.clone()),
            (None, None) => Some(Tools::for_backend(self.support().await.iptables_backend)),
        };
        let (exec, metrics) = (self.exec.clone(), self.metrics.clone());
        self.iptables
            .get_or_insert_with(|| IptablesPlane::new(exec, tools.unwrap_or_default(), metrics))
    }

    fn nft_table(&mut self) -> &mut NftTable {
        let exec = self.exec.clone();
        let process = self.nft_process;
        self.nft.get_or_insert_with(|| {
            let runner = if process {
                Runner::process(&exec)
            } else {
                Runner::new(&exec)
            };
            NftTable::new(runner, super::nft::render::TABLE)
        })
    }

    /// Reads what the kernel holds once, so the next sync rewrites only
    /// what differs: no flush, no window while the agent restarts. Called
    /// implicitly by the first [`sync`](Self::sync).
    pub async fn adopt_kernel_state(&mut self) -> Result<(), Error> {
        self.invalidate();
        Ok(())
    }

    /// Renders `inputs` and brings the kernel to it. Call on every change of
    /// the NodePolicySet, a referenced PeerSet or the CanalNetwork, only once
    /// their watches have listed (an empty NodePolicySet drops every pod's traffic).
    pub async fn sync(&mut self, inputs: &PolicyInputs) -> Result<SyncStats, Error> {
        let start = Instant::now();
        let plane = resolve(inputs.config.dataplane, self.support().await);
        let render_start = Instant::now();
        let (model, desired) = {
            let _span = tracing::debug_span!("render", dataplane = plane.as_str()).entered();
            let model = build_with(inputs, &mut self.model_cache);
            for w in &model.warnings {
                warn!(reason = w.category(), "{w}");
            }
            let desired = self.render(&model, plane, inputs.generation);
            (model, desired)
        };
        let render_time = render_start.elapsed();
        let result = self
            .apply_desired(&desired, start)
            .instrument(tracing::debug_span!(
                "kernel_apply",
                dataplane = plane.as_str()
            ))
            .await;
        if result.is_ok() {
            // Denied flows conntrack still holds end now, not when it forgets them.
            let mode = inputs.config.established;
            self.visibility
                .after_apply(&model, plane, mode, &self.exec)
                .instrument(tracing::debug_span!("conntrack_cut"))
                .await;
        }
        self.last = Some(desired);
        result.map(|mut s| {
            s.render_time = render_time;
            s
        })
    }

    fn render(&mut self, model: &NodeModel, plane: Plane, generation: Option<i64>) -> Desired {
        let (rendered, rules, sets, set_members) = match plane {
            Plane::IpTables => {
                self.nft_cache = NftCache::default();
                let [c4, c6] = &mut self.ipt_cache;
                let v4 = render_model(model, Family::V4, c4);
                let v6 = model
                    .families
                    .v6
                    .then(|| render_model(model, Family::V6, c6));
                let all = std::iter::once(&v4).chain(v6.as_ref());
                let (mut rules, mut sets, mut members) = (0, 0, 0);
                for r in all {
                    rules += r.rule_count();
                    sets += r.sets.len();
                    members += r.member_count();
                }
                (Rendered::IpTables { v4, v6 }, rules, sets, members)
            }
            Plane::NfTables => {
                self.ipt_cache = Default::default();
                let r = super::nft::render::render_with(model, &mut self.nft_cache);
                let (rules, sets, members) = (r.rule_count(), r.sets.len(), r.element_count());
                (Rendered::NfTables(r), rules, sets, members)
            }
        };
        let endpoints = model.endpoints.keys().cloned().collect();
        Desired {
            rendered,
            families: model.families,
            generation,
            handshake: model.enabled,
            endpoints,
            warnings: model.warnings.clone(),
            rules,
            sets,
            set_members,
        }
    }

    /// Re-reads the kernel and repairs anything changed behind our back (a
    /// rule, hook, set or member removed by hand). Returns None before the
    /// first sync.
    pub async fn check_drift(&mut self) -> Result<Option<SyncStats>, Error> {
        let Some(desired) = self.last.clone() else {
            return Ok(None);
        };
        self.invalidate_active(desired.plane());
        let stats = self.apply_desired(&desired, Instant::now()).await?;
        if stats.applied {
            warn!(changes = ?stats.plan, dataplane = desired.plane().as_str(), "repaired policy state changed outside canal-agent");
            self.metrics.record_drift(&stats.plan);
        }
        Ok(Some(stats))
    }

    /// Forgets what was applied, so the next sync reads the kernel first.
    pub fn invalidate(&mut self) {
        if let Some(p) = &mut self.iptables {
            p.invalidate();
        }
        if let Some(t) = &mut self.nft {
            t.invalidate();
        }
        self.other_clean = false;
    }

    fn invalidate_active(&mut self, plane: Plane) {
        match plane {
            Plane::IpTables => {
                if let Some(p) = &mut self.iptables {
                    p.invalidate();
                }
            }
            Plane::NfTables => {
                if let Some(t) = &mut self.nft {
                    t.invalidate();
                }
            }
        }
    }

    /// Applies `desired`; `start` is when the sync began (before rendering).
    async fn apply_desired(
        &mut self,
        desired: &Desired,
        start: Instant,
    ) -> Result<SyncStats, Error> {
        let result = self.apply_inner(desired).await;
        let elapsed = start.elapsed();
        match &result {
            Ok(stats) => {
                let hist = if stats.full {
                    &self.metrics.sync_full_duration
                } else {
                    &self.metrics.sync_partial_duration
                };
                hist.observe(elapsed.as_secs_f64());
                self.metrics.rules.set(stats.rules as i64);
                self.metrics.sets.set(stats.sets as i64);
                self.metrics.set_members.set(stats.set_members as i64);
                self.metrics.endpoints.set(stats.endpoints as i64);
                self.metrics.record_warnings(&stats.warnings);
                self.metrics.record_dataplane(desired.plane());
            }
            Err(e) => {
                self.metrics
                    .sync_errors
                    .with_label_values(&[e.category()])
                    .inc();
            }
        }
        result.map(|mut s| {
            s.duration = elapsed;
            s
        })
    }

    async fn apply_inner(&mut self, desired: &Desired) -> Result<SyncStats, Error> {
        // Before the rules: the CNI must start waiting for endpoint files as
        // soon as enforcement begins, and stop as soon as it ends; endpoints
        // going away lose their file, families going away their entry,
        // before their rules.
        self.handshake.set_enabled(desired.handshake)?;
        self.handshake.remove_except(&desired.endpoints)?;
        self.handshake.narrow_families(desired.families)?;

        let mut stats = SyncStats {
            dataplane: Some(desired.plane()),
            rules: desired.rules,
            sets: desired.sets,
            set_members: desired.set_members,
            endpoints: desired.endpoints.len(),
            warnings: desired.warnings.clone(),
            ..SyncStats::default()
        };
        let mut backoff = self.retry.initial_backoff;
        loop {
            stats.attempts += 1;
            let outcome = self.attempt(desired, &mut stats).await;
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    self.invalidate();
                    if stats.attempts >= self.retry.attempts.max(1) {
                        warn!(
                            attempts = stats.attempts,
                            category = e.category(),
                            "policy sync failed: {e}"
                        );
                        return Err(e);
                    }
                    debug!(
                        attempt = stats.attempts,
                        "policy sync attempt failed, retrying: {e}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
            }
        }
        self.handshake
            .write(&desired.endpoints, desired.generation)?;
        self.handshake.write_families(desired.families)?;
        Ok(stats)
    }

    async fn attempt(&mut self, desired: &Desired, stats: &mut SyncStats) -> Result<(), Error> {
        let plane = desired.plane();
        let kernel = Instant::now();
        match &desired.rendered {
            Rendered::IpTables { v4, v6 } => {
                let ipt = self.iptables_plane().await;
                ipt.apply(v4, stats).await?;
                match v6 {
                    Some(v6) => ipt.apply(v6, stats).await?,
                    None if ipt.known(Family::V6).is_none() => {
                        // IPv6 not guarded: nothing of canal's may stay in ip6tables.
                        clear_v6(ipt, stats).await?;
                    }
                    None => {}
                }
            }
            Rendered::NfTables(r) => {
                let (plan, read, plan_time) =
                    self.nft_table().apply(r).await.map_err(Error::Nft)?;
                stats.plan_time += plan_time;
                stats.full |= read;
                if !plan.is_empty() {
                    self.metrics.restores.with_label_values(&["nft"]).inc();
                    stats.applied = true;
                    stats.plan.add_nft(&plan.stats);
                    stats
                        .written_chains
                        .extend(plan.written_chains.iter().cloned());
                }
            }
        }
        // The new dataplane is complete: now the other one goes.
        if self.active != Some(plane) || !self.other_clean {
            let removed = match plane {
                Plane::IpTables if self.support().await.nftables => {
                    match self.nft_table().remove().await {
                        Ok(r) => r,
                        Err(e) if e.is_missing() => false,
                        Err(e) => return Err(Error::Nft(e)),
                    }
                }
                // No nftables here: nothing of canal's can be in it.
                Plane::IpTables => false,
                Plane::NfTables => {
                    let ipt = self.iptables_plane().await;
                    let mut other = SyncStats::default();
                    let mut any = false;
                    for f in Family::ALL {
                        match ipt.read(f).await {
                            Ok(k) => {
                                let empty =
                                    k.chains.is_empty() && k.hooks.is_empty() && k.sets.is_empty();
                                ipt.set_known(f, k);
                                if !empty {
                                    ipt.apply(&Ruleset::for_family(f), &mut other).await?;
                                    any = true;
                                }
                            }
                            // No such tool (an nftables-only node): nothing to remove.
                            Err(Error::ReadState(ExecError::Spawn { .. })) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    any
                }
            };
            if removed {
                info!(
                    dataplane = plane.as_str(),
                    "removed canal's policy state from the other dataplane"
                );
                stats.removed_other = true;
                stats.applied = true;
            }
            self.active = Some(plane);
            self.other_clean = true;
        }
        stats.restore_time += kernel.elapsed();
        Ok(())
    }

    /// The iptables backend the firewall watch should follow: nf_tables
    /// while canal's nftables table is active (its changes are notified).
    pub async fn backend(&mut self) -> Result<Backend, Error> {
        if self.active == Some(Plane::NfTables) {
            return Ok(Backend::Nft);
        }
        Ok(self.support().await.iptables_backend)
    }

    /// Reads the packet counters of the anti-spoofing drop rules and adds
    /// what they counted since the last read to
    /// `canal_policy_spoofed_packets_total` (a rule rewritten meanwhile
    /// starts again from zero).
    pub async fn record_spoof_counters(&mut self) -> Result<(), Error> {
        let Some(last) = &self.last else {
            return Ok(());
        };
        let reasons = match &last.rendered {
            Rendered::IpTables { v4, v6 } => {
                let mut r = v4.spoof_rules.clone();
                if let Some(v6) = v6 {
                    r.extend(v6.spoof_rules.clone());
                }
                r
            }
            Rendered::NfTables(r) => r.spoof_rules.clone(),
        };
        if reasons.is_empty() {
            return Ok(());
        }
        let families = last.families;
        let counts = match last.plane() {
            Plane::IpTables => {
                let ipt = self.iptables_plane().await;
                let mut c = ipt.raw_counters(Family::V4).await?;
                if families.v6 {
                    c.extend(ipt.raw_counters(Family::V6).await?);
                }
                c
            }
            Plane::NfTables => self
                .nft_table()
                .counters(PREROUTING)
                .await
                .map_err(Error::Nft)?,
        };
        for (hash, reason) in &reasons {
            let Some(&now) = counts.get(hash) else {
                continue;
            };
            let before = self.spoof_seen.get(hash).copied().unwrap_or(0);
            let delta = if now >= before { now - before } else { now };
            if delta > 0 {
                self.metrics
                    .spoofed_packets
                    .with_label_values(&[reason.as_str()])
                    .inc_by(delta);
            }
            self.spoof_seen.insert(hash.clone(), now);
        }
        self.spoof_seen.retain(|h, _| reasons.contains_key(h));
        Ok(())
    }

    /// Whether canal's ipsets differ from what was applied (iptables
    /// dataplane only; nftables set changes are notified).
    pub async fn sets_drifted(&mut self) -> Result<bool, std::io::Error> {
        if self.active == Some(Plane::NfTables) {
            return Ok(false);
        }
        match &mut self.iptables {
            Some(p) => p.sets_drifted().await,
            None => Ok(false),
        }
    }

    /// Whether the legacy tables changed since the last apply or check
    /// (iptables-legacy hosts, which send no change notifications).
    pub async fn legacy_tables_changed(&mut self) -> Result<bool, std::io::Error> {
        self.iptables_plane().await.legacy_tables_changed().await
    }
}

/// Removes canal's ip6tables state, tolerating a node without ip6tables.
async fn clear_v6(ipt: &mut IptablesPlane, stats: &mut SyncStats) -> Result<(), Error> {
    match ipt.apply(&Ruleset::for_family(Family::V6), stats).await {
        Err(Error::ReadState(ExecError::Spawn { .. })) => Ok(()),
        other => other,
    }
}

impl PlanStats {
    /// Adds another plan's counts.
    pub fn add(&mut self, o: &PlanStats) {
        self.chains_written += o.chains_written;
        self.chains_deleted += o.chains_deleted;
        self.rules_written += o.rules_written;
        self.hooks_fixed += o.hooks_fixed;
        self.sets_created += o.sets_created;
        self.sets_swapped += o.sets_swapped;
        self.sets_destroyed += o.sets_destroyed;
        self.members_added += o.members_added;
        self.members_removed += o.members_removed;
    }

    /// Adds an nftables plan's counts (a created table counts as a hook).
    pub fn add_nft(&mut self, o: &NftPlanStats) {
        self.chains_written += o.chains_written;
        self.chains_deleted += o.chains_deleted;
        self.rules_written += o.rules_written;
        self.hooks_fixed += usize::from(o.table_created);
        self.sets_created += o.sets_created;
        self.sets_destroyed += o.sets_destroyed;
        self.members_added += o.elements_added;
        self.members_removed += o.elements_removed;
    }
}

impl NftTable {
    /// Whether listing works here (nftables usable).
    async fn list_json_ok(&self) -> bool {
        self.runner().list_json("list tables").await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_nftables_unless_the_node_is_on_legacy() {
        let s = |nftables, iptables_backend| NodeSupport {
            nftables,
            iptables_backend,
        };
        use DataplaneChoice::*;
        assert_eq!(resolve(Auto, s(true, Backend::Nft)), Plane::NfTables);
        assert_eq!(resolve(Auto, s(true, Backend::Legacy)), Plane::IpTables);
        assert_eq!(resolve(Auto, s(false, Backend::Nft)), Plane::IpTables);
        assert_eq!(
            resolve(NfTables, s(false, Backend::Legacy)),
            Plane::NfTables
        );
        assert_eq!(resolve(IpTables, s(true, Backend::Nft)), Plane::IpTables);
    }
}
