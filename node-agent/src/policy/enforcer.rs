//! The applier: one level-triggered sync that renders the desired ruleset,
//! diffs it against the state it last applied (or read from the kernel on
//! start, on drift checks and after a failure) and applies the difference in
//! at most three batched restores. Nothing is ever flushed wholesale, so an
//! agent restart leaves enforcement in place.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::exec::{Exec, ExecError};
use super::handshake::{Handshake, HandshakeError};
use super::metrics::PolicyMetrics;
use super::names;
use super::plan::{PlanStats, plan};
use super::render::{PolicyInputs, RenderCache, Warning, render_with};
use super::ruleset::{Ruleset, Table};
use super::state::{KernelState, rule_packet_counts};
use super::watch::{self, Backend, IpsetProbe, LegacyProbe, TableInfo};

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
            Error::Handshake(_) => return "handshake_files",
        };
        if matches!(exec, ExecError::Spawn { .. }) {
            return "tool_missing";
        }
        match self {
            Error::ReadState(_) => "read_state",
            Error::IpsetRestore { .. } => "ipset_restore",
            Error::IptablesRestore(_) => "iptables_restore",
            Error::Handshake(_) => "handshake_files",
        }
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// The kernel state was read first (start, drift check, after a failure).
    pub full: bool,
    /// Restores were executed (false: the kernel already matched).
    pub applied: bool,
    /// Attempts needed (1 unless a restore failed and was retried).
    pub attempts: u32,
    /// What the applied plan changed.
    pub plan: PlanStats,
    /// Chains the applied plan wrote (created or rewritten).
    pub written_chains: Vec<String>,
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
    /// Part of it spent rendering the ruleset.
    pub render_time: Duration,
    /// Part of it spent running the restore tools (iptables-restore, ipset).
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

/// Tool names; overridable for tests of failure handling.
#[derive(Clone, Debug)]
pub struct Tools {
    /// `iptables-restore`.
    pub iptables_restore: String,
    /// `iptables-save`.
    pub iptables_save: String,
    /// `ipset`.
    pub ipset: String,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            iptables_restore: "iptables-restore".into(),
            iptables_save: "iptables-save".into(),
            ipset: "ipset".into(),
        }
    }
}

#[derive(Clone, Debug)]
struct Desired {
    ruleset: Ruleset,
    generation: Option<i64>,
    /// canal-cni must wait for endpoint files (policy is enabled: unknown
    /// interfaces are dropped).
    handshake: bool,
    warnings: Vec<Warning>,
}

/// The legacy tables the cheap change check looks at.
const LEGACY_TABLES: [&str; 3] = ["raw", "filter", "security"];

/// Programs NetworkPolicy into the node's kernel. Owned by the agent's sync
/// loop; every method takes `&mut self`, so syncs never overlap.
#[derive(Debug)]
pub struct PolicyEnforcer {
    exec: Exec,
    tools: Tools,
    retry: Retry,
    timeout: Duration,
    handshake: Handshake,
    metrics: PolicyMetrics,
    /// What the kernel holds, as far as we know; None: read it before diffing.
    known: Option<KernelState>,
    /// The last desired state, for drift checks.
    last: Option<Desired>,
    /// PeerSet-derived sets of the last render.
    cache: RenderCache,
    /// False once the kernel has shown it has no `security` table (a
    /// legacy host without `iptable_security`): the guard is left out.
    guard_supported: bool,
    /// Packet counts of the anti-spoofing drop rules at the last read, by hash.
    spoof_seen: BTreeMap<String, u64>,
    /// Reads ipset headers (opened on first use, in the tools' namespace).
    ipset_probe: Option<Arc<IpsetProbe>>,
    /// Reads legacy table sizes (iptables-legacy hosts only).
    legacy_probe: Option<Arc<LegacyProbe>>,
    /// Legacy table sizes right after the last apply or check.
    legacy_baseline: Option<Vec<TableInfo>>,
}

impl PolicyEnforcer {
    /// An enforcer for this node's kernel, writing handshake files under `run_dir`.
    pub fn new(run_dir: &Path, metrics: PolicyMetrics) -> PolicyEnforcer {
        PolicyEnforcer {
            exec: Exec::host(),
            tools: Tools::default(),
            retry: Retry::default(),
            timeout: Duration::from_secs(60),
            handshake: Handshake::new(run_dir),
            metrics,
            known: None,
            last: None,
            cache: RenderCache::default(),
            guard_supported: true,
            spoof_seen: BTreeMap::new(),
            ipset_probe: None,
            legacy_probe: None,
            legacy_baseline: None,
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

    /// Overrides the tool names.
    pub fn with_tools(mut self, tools: Tools) -> PolicyEnforcer {
        self.tools = tools;
        self
    }

    /// Reads what the kernel holds (our chains, hooks and sets) once, so the
    /// next sync rewrites only what differs: no flush, no window while the
    /// agent restarts. Called implicitly by the first [`sync`](Self::sync).
    pub async fn adopt_kernel_state(&mut self) -> Result<&KernelState, Error> {
        let state = self.read_kernel().await?;
        info!(
            chains = state.chains.len(),
            rules = state.rule_count(),
            sets = state.sets.len(),
            "read policy state from the kernel"
        );
        Ok(self.known.insert(state))
    }

    /// Renders `inputs` and brings the kernel to it. Call on every change of
    /// the NodePolicySet, a referenced PeerSet or the CanalNetwork, only once
    /// their watches have listed (an empty NodePolicySet drops every pod's traffic).
    pub async fn sync(&mut self, inputs: &PolicyInputs) -> Result<SyncStats, Error> {
        let start = Instant::now();
        let rendered = render_with(inputs, &mut self.cache);
        let render_time = start.elapsed();
        for w in &rendered.warnings {
            warn!(reason = w.category(), "{w}");
        }
        let desired = Desired {
            ruleset: rendered.ruleset,
            generation: inputs.generation,
            handshake: inputs.config.enabled,
            warnings: rendered.warnings,
        };
        let result = self.apply_desired(&desired, start).await;
        self.last = Some(desired);
        result.map(|mut s| {
            s.render_time = render_time;
            s
        })
    }

    /// Re-reads the kernel and repairs anything changed behind our back (a
    /// rule, hook, set or member removed by hand). Returns None before the
    /// first sync. Run it periodically (Felix: every 90 s).
    pub async fn check_drift(&mut self) -> Result<Option<SyncStats>, Error> {
        let Some(desired) = self.last.clone() else {
            return Ok(None);
        };
        self.known = None;
        let stats = self.apply_desired(&desired, Instant::now()).await?;
        if stats.applied {
            warn!(changes = ?stats.plan, "repaired policy state changed outside canal-agent");
            self.metrics.record_drift(&stats.plan);
        }
        Ok(Some(stats))
    }

    /// Forgets what was applied, so the next sync reads the kernel first.
    pub fn invalidate(&mut self) {
        self.known = None;
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
        let r = &desired.ruleset;
        // Before the rules: the CNI must start waiting for endpoint files as
        // soon as enforcement begins, and stop as soon as it ends.
        self.handshake.set_enabled(desired.handshake)?;
        // Endpoints that are going away lose their file before their chains.
        self.handshake.remove_except(&r.endpoints)?;

        let mut stats = SyncStats {
            rules: r.rule_count(),
            sets: r.sets.len(),
            set_members: r.member_count(),
            endpoints: r.endpoints.len(),
            warnings: desired.warnings.clone(),
            ..SyncStats::default()
        };
        let mut backoff = self.retry.initial_backoff;
        loop {
            stats.attempts += 1;
            let outcome = self.attempt(r, &mut stats).await;
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    self.known = None;
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
        self.handshake.write(&r.endpoints, desired.generation)?;
        Ok(stats)
    }

    async fn attempt(&mut self, desired: &Ruleset, stats: &mut SyncStats) -> Result<(), Error> {
        let known = match self.known.take() {
            Some(k) => k,
            None => {
                stats.full = true;
                self.read_kernel().await?
            }
        };
        let stripped;
        let desired = if self.guard_supported {
            desired
        } else {
            stripped = without_guard(desired);
            &stripped
        };
        let p = plan(&known, desired);
        if p.is_empty() {
            self.known = Some(known);
            return Ok(());
        }
        stats.plan = p.stats;
        stats.written_chains = p.written_chains.clone();
        stats.applied = true;
        debug!(changes = ?p.stats, "applying policy changes");
        let tools_start = Instant::now();
        if !p.ipset_pre.is_empty() {
            self.ipset_restore(&p.ipset_pre, "create/update").await?;
        }
        if !p.iptables.is_empty() {
            self.metrics.restores.with_label_values(&["iptables"]).inc();
            self.exec
                .run(
                    &self.tools.iptables_restore,
                    &["--noflush", "--wait", "10"],
                    Some(&p.iptables),
                    self.timeout,
                )
                .await
                .map_err(|e| {
                    self.metrics
                        .restore_failures
                        .with_label_values(&["iptables"])
                        .inc();
                    Error::IptablesRestore(e)
                })?;
        }
        if !p.ipset_post.is_empty() {
            self.ipset_restore(&p.ipset_post, "destroy").await?;
        }
        stats.restore_time += tools_start.elapsed();
        self.known = Some(KernelState::from_ruleset(desired));
        // Our own writes are the new baseline (a getsockopt per table).
        self.legacy_baseline = self
            .legacy_probe
            .as_ref()
            .map(|p| p.fingerprint(&LEGACY_TABLES));
        Ok(())
    }

    async fn ipset_restore(&self, text: &str, stage: &'static str) -> Result<(), Error> {
        self.metrics.restores.with_label_values(&["ipset"]).inc();
        self.exec
            .run(
                &self.tools.ipset,
                &["-exist", "restore"],
                Some(text),
                self.timeout,
            )
            .await
            .map(|_| ())
            .map_err(|source| {
                self.metrics
                    .restore_failures
                    .with_label_values(&["ipset"])
                    .inc();
                Error::IpsetRestore { stage, source }
            })
    }

    async fn read_kernel(&mut self) -> Result<KernelState, Error> {
        let mut iptables = String::new();
        for table in Table::ALL {
            let listing = self
                .exec
                .run(
                    &self.tools.iptables_save,
                    &["-t", table.as_str()],
                    None,
                    self.timeout,
                )
                .await;
            match listing {
                Ok(text) => iptables.push_str(&text),
                Err(ExecError::Failed { stderr, .. })
                    if table == Table::Security && self.guard_supported =>
                {
                    // No security table on this host: enforce without the guard.
                    warn!(
                        "the security table is not available ({stderr}); running without the fail-closed guard"
                    );
                    self.guard_supported = false;
                }
                Err(e) => return Err(Error::ReadState(e)),
            }
        }
        let ipsets = self
            .exec
            .run(&self.tools.ipset, &["save"], None, self.timeout)
            .await
            .map_err(Error::ReadState)?;
        Ok(KernelState::parse(&iptables, &ipsets))
    }

    /// The iptables backend of the node's tools (`iptables-save --version`).
    pub async fn backend(&self) -> Result<Backend, Error> {
        let out = self
            .exec
            .run(
                &self.tools.iptables_save,
                &["--version"],
                None,
                self.timeout,
            )
            .await
            .map_err(Error::ReadState)?;
        Ok(watch::backend_of(&out))
    }

    /// Reads the packet counters of the anti-spoofing drop rules and adds
    /// what they counted since the last read to
    /// `canal_policy_spoofed_packets_total` (a rule rewritten meanwhile
    /// starts again from zero).
    pub async fn record_spoof_counters(&mut self) -> Result<(), Error> {
        let Some(last) = &self.last else {
            return Ok(());
        };
        let reasons = last.ruleset.spoof_rules.clone();
        if reasons.is_empty() {
            return Ok(());
        }
        let save = self
            .exec
            .run(
                &self.tools.iptables_save,
                &["-c", "-t", Table::Raw.as_str()],
                None,
                self.timeout,
            )
            .await
            .map_err(Error::ReadState)?;
        let counts = rule_packet_counts(&save);
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

    /// Whether canal's ipsets differ from what was applied, by their
    /// headers only (name, type, entry count; one netlink dump, no
    /// listing): catches `ipset flush`, `destroy`, `add` and `del`, which
    /// nf_tables does not notify. False when the kernel state is unknown
    /// (the next sync reads it anyway).
    pub async fn sets_drifted(&mut self) -> Result<bool, std::io::Error> {
        let Some(known) = &self.known else {
            return Ok(false);
        };
        let want: BTreeMap<String, (String, usize)> = known
            .sets
            .iter()
            .map(|(n, s)| (n.clone(), (s.set_type.clone(), s.members.len())))
            .collect();
        let probe = match &self.ipset_probe {
            Some(p) => p.clone(),
            None => {
                let netns = self.exec.netns().map(Path::to_path_buf);
                let p = tokio::task::spawn_blocking(move || IpsetProbe::open(netns.as_deref()))
                    .await
                    .map_err(std::io::Error::other)??;
                self.ipset_probe.insert(Arc::new(p)).clone()
            }
        };
        let headers = tokio::task::spawn_blocking(move || probe.headers())
            .await
            .map_err(std::io::Error::other)??;
        let have: BTreeMap<String, (String, usize)> = headers
            .into_iter()
            .filter(|h| names::is_owned_set(&h.name))
            .map(|h| {
                let count = h.elements.map_or(usize::MAX, |e| e as usize);
                (h.name, (h.set_type, count))
            })
            .collect();
        Ok(have != want)
    }

    /// Whether the legacy tables changed since the last apply or check
    /// (iptables-legacy hosts, which send no change notifications): their
    /// entry counts and sizes, read without a process. The first call
    /// records the baseline; every apply moves it.
    pub async fn legacy_tables_changed(&mut self) -> Result<bool, std::io::Error> {
        let probe = match &self.legacy_probe {
            Some(p) => p.clone(),
            None => {
                let netns = self.exec.netns().map(Path::to_path_buf);
                let p = tokio::task::spawn_blocking(move || LegacyProbe::open(netns.as_deref()))
                    .await
                    .map_err(std::io::Error::other)??;
                self.legacy_probe.insert(Arc::new(p)).clone()
            }
        };
        let now = probe.fingerprint(&LEGACY_TABLES);
        // A change is reported once; the drift check it triggers reads the
        // tables after this baseline, so nothing in between is missed.
        let changed = self.legacy_baseline.as_ref().is_some_and(|b| *b != now);
        self.legacy_baseline = Some(now);
        Ok(changed)
    }
}

/// `ruleset` without the guard's chains and hooks (security table).
fn without_guard(ruleset: &Ruleset) -> Ruleset {
    let mut r = ruleset.clone();
    r.chains
        .retain(|n, _| names::chain_table(n) != Some(Table::Security));
    r.hooks.retain(|h| h.table != Table::Security);
    r
}
