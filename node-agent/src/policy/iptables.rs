//! The iptables dataplane: per family, at most three batches (`ipset
//! restore`, one `iptables-restore --noflush` / `ip6tables-restore
//! --noflush` run with one transaction per table, a final `ipset restore`),
//! diffed against the state applied last or read from the kernel
//! ([`super::state`], [`super::plan`]).
//!
//! The tools are the node's backend's: [`detect_backend`] decides between
//! iptables-legacy and iptables-nft the way kube-proxy's iptables-wrapper
//! does (kubelet's hint chains first, else whichever has more rules), so
//! canal never programs a backend the node does not use.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::enforcer::{Error, SyncStats};
use super::exec::{Exec, ExecError};
use super::metrics::PolicyMetrics;
use super::model::Family;
use super::names;
use super::plan::plan;
use super::ruleset::{Ruleset, Table};
use super::state::{KernelState, rule_packet_counts};
use super::watch::{Backend, IpsetProbe, LegacyProbe, TableInfo};

/// Tool names; overridable for tests of failure handling.
#[derive(Clone, Debug)]
pub struct Tools {
    /// `iptables-restore`.
    pub iptables_restore: String,
    /// `iptables-save`.
    pub iptables_save: String,
    /// `ip6tables-restore`.
    pub ip6tables_restore: String,
    /// `ip6tables-save`.
    pub ip6tables_save: String,
    /// `ipset`.
    pub ipset: String,
}

impl Default for Tools {
    /// The image's default backend (`iptables-restore` ...).
    fn default() -> Self {
        Tools {
            iptables_restore: "iptables-restore".into(),
            iptables_save: "iptables-save".into(),
            ip6tables_restore: "ip6tables-restore".into(),
            ip6tables_save: "ip6tables-save".into(),
            ipset: "ipset".into(),
        }
    }
}

impl Tools {
    /// The tools of one backend (`iptables-nft-restore`, `iptables-legacy-save`, ...).
    pub fn for_backend(backend: Backend) -> Tools {
        let b = match backend {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        };
        Tools {
            iptables_restore: format!("iptables-{b}-restore"),
            iptables_save: format!("iptables-{b}-save"),
            ip6tables_restore: format!("ip6tables-{b}-restore"),
            ip6tables_save: format!("ip6tables-{b}-save"),
            ipset: "ipset".into(),
        }
    }

    fn restore(&self, f: Family) -> &str {
        match f {
            Family::V4 => &self.iptables_restore,
            Family::V6 => &self.ip6tables_restore,
        }
    }

    fn save(&self, f: Family) -> &str {
        match f {
            Family::V4 => &self.iptables_save,
            Family::V6 => &self.ip6tables_save,
        }
    }
}

/// kube-proxy's iptables-wrapper decision from the listings of both
/// backends (IPv4 and IPv6 concatenated): a backend with kubelet's hint
/// chains (`KUBE-IPTABLES-HINT`, `KUBE-KUBELET-CANARY`) wins, nf_tables
/// first; else the one with more rules; a tie (an empty node) is nf_tables.
pub fn choose_backend(legacy_save: &str, nft_save: &str) -> Backend {
    let hints = |s: &str| {
        s.lines()
            .any(|l| l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY"))
    };
    if hints(nft_save) {
        return Backend::Nft;
    }
    if hints(legacy_save) {
        return Backend::Legacy;
    }
    let rules = |s: &str| s.lines().filter(|l| l.starts_with("-A ")).count();
    if rules(legacy_save) > rules(nft_save) {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// Runs both backends' save tools (a missing one lists nothing) and
/// applies [`choose_backend`].
pub async fn detect_backend(exec: &Exec) -> Backend {
    let timeout = Duration::from_secs(10);
    let mut listings = [String::new(), String::new()];
    for (i, b) in ["legacy", "nft"].iter().enumerate() {
        for tool in [format!("iptables-{b}-save"), format!("ip6tables-{b}-save")] {
            if let Ok(out) = exec.run(&tool, &[], None, timeout).await {
                listings[i].push_str(&out);
            }
        }
    }
    choose_backend(&listings[0], &listings[1])
}

/// The legacy tables the cheap change check looks at.
const LEGACY_TABLES: [&str; 3] = ["raw", "filter", "security"];

/// Programs the iptables half of enforcement in one namespace.
#[derive(Debug)]
pub struct IptablesPlane {
    exec: Exec,
    /// The tools.
    pub tools: Tools,
    timeout: Duration,
    metrics: PolicyMetrics,
    /// Per family: what the kernel holds, as far as we know.
    known: [Option<KernelState>; 2],
    /// Per family: false once the kernel has shown it has no `security`
    /// table (the guard is left out).
    guard_supported: [bool; 2],
    ipset_probe: Option<Arc<IpsetProbe>>,
    legacy_probe: Option<Arc<LegacyProbe>>,
    legacy_baseline: Option<Vec<TableInfo>>,
}

fn idx(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl IptablesPlane {
    /// A plane using `tools` in `exec`'s namespace.
    pub fn new(exec: Exec, tools: Tools, metrics: PolicyMetrics) -> IptablesPlane {
        IptablesPlane {
            exec,
            tools,
            timeout: Duration::from_secs(60),
            metrics,
            known: [None, None],
            guard_supported: [true, true],
            ipset_probe: None,
            legacy_probe: None,
            legacy_baseline: None,
        }
    }

    /// Forgets what was applied (the next apply reads the kernel).
    pub fn invalidate(&mut self) {
        self.known = [None, None];
    }

    /// What is known of a family (None: unknown).
    pub fn known(&self, f: Family) -> Option<&KernelState> {
        self.known[idx(f)].as_ref()
    }

    /// Brings one family's tables and sets to `desired`; records what it
    /// did in `stats`.
    pub async fn apply(&mut self, desired: &Ruleset, stats: &mut SyncStats) -> Result<(), Error> {
        let f = desired.family;
        let known = match self.known[idx(f)].take() {
            Some(k) => k,
            None => {
                stats.full = true;
                self.read(f).await?
            }
        };
        let stripped;
        let desired = if self.guard_supported[idx(f)] {
            desired
        } else {
            stripped = without_guard(desired);
            &stripped
        };
        let plan_start = std::time::Instant::now();
        let p = plan(&known, desired);
        stats.plan_time += plan_start.elapsed();
        if p.is_empty() {
            self.known[idx(f)] = Some(known);
            return Ok(());
        }
        stats.plan.add(&p.stats);
        stats
            .written_chains
            .extend(p.written_chains.iter().cloned());
        stats.applied = true;
        if !p.ipset_pre.is_empty() {
            self.ipset_restore(&p.ipset_pre, "create/update").await?;
        }
        if !p.iptables.is_empty() {
            self.metrics.restores.with_label_values(&["iptables"]).inc();
            let tool = self.tools.restore(f).to_string();
            self.exec
                .run(
                    &tool,
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
        self.known[idx(f)] = Some(KernelState::from_ruleset(desired));
        // Our own writes are the new baseline (a getsockopt per table).
        self.legacy_baseline = self
            .legacy_probe
            .as_ref()
            .map(|p| p.fingerprint(&LEGACY_TABLES));
        Ok(())
    }

    /// Records what the kernel holds of a family (just read).
    pub fn set_known(&mut self, f: Family, state: KernelState) {
        self.known[idx(f)] = Some(state);
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

    /// Reads one family's tables and sets.
    pub async fn read(&mut self, f: Family) -> Result<KernelState, Error> {
        let mut iptables = String::new();
        let save = self.tools.save(f).to_string();
        for table in Table::ALL {
            let listing = self
                .exec
                .run(&save, &["-t", table.as_str()], None, self.timeout)
                .await;
            match listing {
                Ok(text) => iptables.push_str(&text),
                Err(ExecError::Failed { stderr, .. })
                    if table == Table::Security && self.guard_supported[idx(f)] =>
                {
                    warn!(
                        "the {} security table is not available ({stderr}); running without the fail-closed guard",
                        f.as_str()
                    );
                    self.guard_supported[idx(f)] = false;
                }
                Err(e) => return Err(Error::ReadState(e)),
            }
        }
        let ipsets = self
            .exec
            .run(&self.tools.ipset, &["save"], None, self.timeout)
            .await
            .map_err(Error::ReadState)?;
        Ok(KernelState::parse_family(&iptables, &ipsets, f))
    }

    /// The backend named by the configured tools' `--version`.
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
        Ok(super::watch::backend_of(&out))
    }

    /// Packet counters of canal's raw-table rules (anti-spoofing) of a family.
    pub async fn raw_counters(&self, f: Family) -> Result<BTreeMap<String, u64>, Error> {
        let save = self
            .exec
            .run(
                self.tools.save(f),
                &["-c", "-t", Table::Raw.as_str()],
                None,
                self.timeout,
            )
            .await
            .map_err(Error::ReadState)?;
        Ok(rule_packet_counts(&save))
    }

    /// Whether canal's ipsets differ from what was applied, by their
    /// headers only (name, type, entry count; one netlink dump): catches
    /// `ipset flush`, `destroy`, `add` and `del`, which nf_tables does not
    /// notify. False while the kernel state is unknown.
    pub async fn sets_drifted(&mut self) -> Result<bool, std::io::Error> {
        if self.known.iter().all(Option::is_none) {
            return Ok(false);
        }
        let want: BTreeMap<String, (String, usize)> = self
            .known
            .iter()
            .flatten()
            .flat_map(|k| k.sets.iter())
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
    /// (iptables-legacy hosts, which send no change notifications).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_is_the_one_the_node_uses() {
        let rules = |n: usize| {
            let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
            for i in 0..n {
                s.push_str(&format!("-A INPUT -s 10.0.0.{i} -j ACCEPT\n"));
            }
            s.push_str("COMMIT\n");
            s
        };
        assert_eq!(choose_backend("", ""), Backend::Nft, "an empty node");
        assert_eq!(choose_backend(&rules(12), &rules(3)), Backend::Legacy);
        assert_eq!(choose_backend(&rules(3), &rules(12)), Backend::Nft);
        let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        assert_eq!(
            choose_backend(hint, &rules(50)),
            Backend::Legacy,
            "kubelet's hint beats rule counts"
        );
        assert_eq!(
            choose_backend(hint, &format!("{}{hint}", rules(1))),
            Backend::Nft
        );
    }

    #[test]
    fn tools_follow_the_backend() {
        let t = Tools::for_backend(Backend::Legacy);
        assert_eq!(t.restore(Family::V6), "ip6tables-legacy-restore");
        assert_eq!(t.save(Family::V4), "iptables-legacy-save");
    }
}
