//! Masquerade and FORWARD-accept rules of the overlay, per family, on the
//! node's dataplane (the same `spec.policy.dataplane` choice as policy,
//! [`crate::policy::resolve`]): iptables (nat `CANAL-MASQ`, filter
//! `CANAL-FWD-ALLOW`, [`render`]; read with `iptables-save`, written with
//! one `iptables-restore --noflush --wait` batch per table, only when
//! something differs; ip6tables for IPv6; the node's backend's tools) or
//! canal's nftables table `inet canal-masq` ([`nft`], one transaction).
//! Switching programs the new dataplane first, then removes the old one.
//!
//! The agent's loop checks the rules on every resync; in between, a keeper
//! in the agent's own namespace listens to nf_tables change notifications
//! ([`crate::policy::watch`]) and repairs the rules within milliseconds
//! when another program changes `POSTROUTING`, `FORWARD` or canal's chains
//! (a firewall reload), ignoring the agent's own writes.

pub mod nft;
pub mod render;

use std::ffi::OsString;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::Mutex;

use crate::policy::enforcer::{NodeSupport, Plane, resolve};
use crate::policy::exec::Exec;
use crate::policy::model::{DataplaneChoice, Family};
use crate::policy::nft::{NftRuleset, NftTable, Runner};
use crate::policy::watch::{self, Backend, Change, ObjectKind};
use render::{ChainSpec, MasqParams};

/// An iptables command failed.
#[derive(Debug, thiserror::Error)]
#[error("{step} (table {table}): {message}")]
pub struct IptablesError {
    /// What failed.
    pub step: Step,
    /// The table.
    pub table: &'static str,
    /// The command's error output or the I/O error.
    pub message: String,
}

/// The iptables step that failed (bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `iptables-save`.
    Save,
    /// `iptables-restore`.
    Restore,
    /// `iptables --version`.
    Version,
    /// An nftables transaction or listing.
    Nft,
}

impl Step {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Save => "save",
            Step::Restore => "restore",
            Step::Version => "version",
            Step::Nft => "nft",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Save => "iptables-save",
            Step::Restore => "iptables-restore",
            Step::Version => "iptables --version",
            Step::Nft => "nft",
        })
    }
}

/// Runs the iptables tools, optionally behind a command prefix (tests use
/// `ip netns exec <ns>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iptables {
    prefix: Vec<OsString>,
    /// `iptables` or `ip6tables`.
    base: &'static str,
    /// `""`, `-nft` or `-legacy`: the backend's tools.
    backend: &'static str,
}

impl Default for Iptables {
    fn default() -> Self {
        Iptables {
            prefix: Vec::new(),
            base: "iptables",
            backend: "",
        }
    }
}

impl Iptables {
    /// The tools of the agent's own network namespace.
    pub fn new() -> Iptables {
        Iptables::default()
    }

    /// Runs every command as `PREFIX... iptables-...`.
    pub fn with_prefix(prefix: impl IntoIterator<Item = impl Into<OsString>>) -> Iptables {
        Iptables {
            prefix: prefix.into_iter().map(Into::into).collect(),
            ..Iptables::default()
        }
    }

    /// The same prefix, for `family` and `backend`'s tools.
    pub fn for_family(&self, family: Family, backend: Option<Backend>) -> Iptables {
        Iptables {
            prefix: self.prefix.clone(),
            base: match family {
                Family::V4 => "iptables",
                Family::V6 => "ip6tables",
            },
            backend: match backend {
                None => "",
                Some(Backend::Nft) => "-nft",
                Some(Backend::Legacy) => "-legacy",
            },
        }
    }

    fn tool(&self, suffix: &str) -> String {
        format!("{}{}{suffix}", self.base, self.backend)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.kill_on_drop(true);
        cmd
    }

    async fn output(
        &self,
        mut cmd: Command,
        step: Step,
        table: &'static str,
        stdin: Option<&str>,
    ) -> Result<String, IptablesError> {
        let err = |message: String| IptablesError {
            step,
            table,
            message,
        };
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| err(e.to_string()))?;
        // Before it gets its input: its changes are ours, not drift (the
        // keeper would otherwise repair after its own writes).
        let pid = child.id();
        if let Some(pid) = pid {
            watch::own_writers().started(pid);
        }
        let fed = match (stdin, child.stdin.take()) {
            (Some(text), Some(mut pipe)) => pipe.write_all(text.as_bytes()).await,
            _ => Ok(()),
        };
        let out = child.wait_with_output().await;
        if let Some(pid) = pid {
            watch::own_writers().exited(pid);
        }
        fed.map_err(|e| err(e.to_string()))?;
        let out = out.map_err(|e| err(e.to_string()))?;
        if !out.status.success() {
            return Err(err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables-save -t <table>`.
    pub async fn save(&self, table: &'static str) -> Result<String, IptablesError> {
        let mut cmd = self.command(&self.tool("-save"));
        cmd.args(["-t", table]);
        self.output(cmd, Step::Save, table, None).await
    }

    /// `iptables-restore --noflush --wait` with `text` on stdin.
    pub async fn restore(&self, table: &'static str, text: &str) -> Result<(), IptablesError> {
        let mut cmd = self.command(&self.tool("-restore"));
        cmd.args(["--noflush", "--wait"]);
        self.output(cmd, Step::Restore, table, Some(text))
            .await
            .map(drop)
    }

    /// Whether this iptables supports `--random-fully`.
    pub async fn random_fully(&self) -> Result<bool, IptablesError> {
        let mut cmd = self.command(&self.tool(""));
        cmd.arg("--version");
        let out = self.output(cmd, Step::Version, "-", None).await?;
        Ok(render::supports_random_fully(&out))
    }
}

/// What the overlay's rules should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RulesConfig {
    /// The IPv4 clusterCIDR and this node's IPv4 subnet (None on an
    /// IPv6-only node).
    pub ipv4: Option<(Ipv4Net, Ipv4Net)>,
    /// CanalNetwork `masquerade`.
    pub masquerade: bool,
    /// The IPv6 clusterCIDR and this node's IPv6 subnet (None on an
    /// IPv4-only node).
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
    /// `spec.policy.dataplane`.
    pub dataplane: DataplaneChoice,
}

impl RulesConfig {
    /// (family, clusterCIDR, node subnet) of every family the node has.
    fn families(&self) -> Vec<(Family, IpNet, IpNet)> {
        let mut out = Vec::new();
        if let Some((c, n)) = self.ipv4 {
            out.push((Family::V4, IpNet::V4(c), IpNet::V4(n)));
        }
        if let Some((c, n)) = self.ipv6 {
            out.push((Family::V6, IpNet::V6(c), IpNet::V6(n)));
        }
        out
    }
}

/// What one pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Tables rewritten.
    pub rewritten: Vec<&'static str>,
    /// Tables rewritten although the wanted rules had not changed since
    /// they were last written (someone changed them: drift).
    pub repaired: Vec<&'static str>,
}

/// Keeps the overlay's iptables rules in place.
#[derive(Debug, Clone)]
pub struct Masquerade {
    inner: Arc<Mutex<Keeper>>,
    /// Repair on change notifications (only in the agent's own namespace).
    auto_repair: bool,
    repairing: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct Keeper {
    iptables: Iptables,
    /// Where nftables runs and backends are detected (None: a prefixed
    /// test keeper, iptables only).
    exec: Option<Exec>,
    support: Option<NodeSupport>,
    random_fully: Option<bool>,
    /// iptables specs written last, with the tools of their family.
    written: Vec<(Iptables, ChainSpec)>,
    nft: Option<NftTable>,
    written_nft: Option<NftRuleset>,
    /// The dataplane of the last successful sync; whether the other one is
    /// known to hold nothing of canal's.
    plane: Option<Plane>,
    other_clean: bool,
}

/// Wait after the first foreign change before repairing (a reload is a burst).
const SETTLE: Duration = Duration::from_millis(20);

impl Masquerade {
    /// A keeper using `iptables`. With the tools of the agent's own
    /// namespace (no prefix) it also repairs the rules as soon as another
    /// program changes them.
    pub fn new(iptables: Iptables) -> Masquerade {
        let host = iptables.prefix.is_empty();
        Masquerade::with_parts(iptables, host.then(Exec::host), host)
    }

    /// A keeper for the network namespace at `path` (tests): iptables
    /// through `nsenter`, nftables through libnftables inside it.
    pub fn in_netns(path: &std::path::Path) -> std::io::Result<Masquerade> {
        let exec = Exec::in_netns(path)?;
        let iptables = Iptables::with_prefix([
            OsString::from("nsenter"),
            OsString::from(format!("--net={}", path.display())),
            OsString::from("--"),
        ]);
        Ok(Masquerade::with_parts(iptables, Some(exec), false))
    }

    fn with_parts(iptables: Iptables, exec: Option<Exec>, auto_repair: bool) -> Masquerade {
        Masquerade {
            inner: Arc::new(Mutex::new(Keeper {
                iptables,
                exec,
                support: None,
                random_fully: None,
                written: Vec::new(),
                nft: None,
                written_nft: None,
                plane: None,
                other_clean: false,
            })),
            auto_repair,
            repairing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Brings the rules to `config`. The tables are read only when the
    /// wanted rules changed or `check` is set (the periodic drift check), so
    /// bursts of Node events do not run iptables-save each time.
    pub async fn sync(
        &mut self,
        config: &RulesConfig,
        check: bool,
    ) -> Result<Outcome, IptablesError> {
        let outcome = self.inner.lock().await.sync(config, check).await;
        if outcome.is_ok() && self.auto_repair {
            self.start_repairs();
        }
        outcome
    }

    /// Starts (once) the task that repairs the written rules when another
    /// program changes the tables they live in.
    fn start_repairs(&self) {
        use std::sync::atomic::Ordering;
        if self.repairing.swap(true, Ordering::Relaxed) {
            return;
        }
        let Some(w) = watch::host_watch() else {
            return;
        };
        let mut changes = w.subscribe();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                let first = match changes.recv().await {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Change::Lost,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if !concerns_masquerade(&first) {
                    continue;
                }
                tokio::time::sleep(SETTLE).await;
                // Whatever else arrived meanwhile is covered by this check.
                while changes.try_recv().is_ok() {}
                let mut keeper = inner.lock().await;
                match keeper.repair().await {
                    Ok(tables) if !tables.is_empty() => tracing::warn!(
                        ?tables,
                        "repaired iptables rules changed by another program"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("repairing the masquerade rules: {e}"),
                }
            }
        });
    }
}

/// Whether a foreign change touches the overlay's rules: `nat` POSTROUTING
/// or CANAL-MASQ, `filter` FORWARD or CANAL-FWD-ALLOW, or either table as a
/// whole. Lost notifications always do.
pub fn concerns_masquerade(change: &Change) -> bool {
    match change {
        Change::Lost => true,
        Change::Nft {
            family,
            table,
            object,
            chain,
        } => {
            if *family == crate::policy::nfnl::FAMILY_INET {
                return table == nft::TABLE;
            }
            let ip = [
                crate::policy::nfnl::FAMILY_IPV4,
                crate::policy::nfnl::FAMILY_IPV6,
            ];
            if !ip.contains(family) || *object == ObjectKind::Set {
                return false;
            }
            let chains: &[&str] = match table.as_str() {
                "nat" => &["POSTROUTING", render::MASQ_CHAIN],
                "filter" => &["FORWARD", render::FORWARD_CHAIN],
                _ => return false,
            };
            chain.as_deref().is_none_or(|c| chains.contains(&c))
        }
    }
}

impl Keeper {
    /// What the node offers (probed once).
    async fn support(&mut self) -> NodeSupport {
        if let Some(s) = self.support {
            return s;
        }
        let s = match &self.exec {
            Some(exec) => {
                let iptables_backend = crate::policy::iptables::detect_backend(exec).await;
                let nft = self.nft_table();
                let nftables = match nft {
                    Some(t) => t.runner().list_json("list tables").await.is_ok(),
                    None => false,
                };
                NodeSupport {
                    nftables,
                    iptables_backend,
                }
            }
            None => NodeSupport {
                nftables: false,
                iptables_backend: Backend::Nft,
            },
        };
        self.support = Some(s);
        s
    }

    fn nft_table(&mut self) -> Option<&mut NftTable> {
        let exec = self.exec.clone()?;
        Some(
            self.nft
                .get_or_insert_with(|| NftTable::new(Runner::new(&exec), nft::TABLE)),
        )
    }

    /// The tools of a family for the node's backend.
    fn tools(&self, family: Family) -> Iptables {
        let backend = match self.exec {
            Some(_) => self.support.map(|s| s.iptables_backend),
            None => None,
        };
        self.iptables.for_family(family, backend)
    }

    async fn sync(&mut self, config: &RulesConfig, check: bool) -> Result<Outcome, IptablesError> {
        let support = self.support().await;
        let plane = resolve(config.dataplane, support);
        let mut outcome = Outcome::default();
        match plane {
            Plane::IpTables => self.sync_iptables(config, check, &mut outcome).await?,
            Plane::NfTables => self.sync_nft(config, check, &mut outcome).await?,
        }
        if self.plane != Some(plane) || !self.other_clean {
            self.clear_other(plane, support, &mut outcome).await?;
            self.plane = Some(plane);
            self.other_clean = true;
        }
        Ok(outcome)
    }

    async fn sync_iptables(
        &mut self,
        config: &RulesConfig,
        check: bool,
        outcome: &mut Outcome,
    ) -> Result<(), IptablesError> {
        let families = config.families();
        // The first family's tool answers for the backend (an IPv6-only
        // node's iptables may be ip6tables alone).
        let probe = families.first().map_or(Family::V4, |f| f.0);
        let random_fully = match self.random_fully {
            Some(r) => r,
            None => {
                let r = self.tools(probe).random_fully().await?;
                self.random_fully = Some(r);
                r
            }
        };
        let mut specs = Vec::new();
        for &(family, cluster_cidr, node_subnet) in &families {
            let params = MasqParams {
                cluster_cidr,
                node_subnet,
                random_fully,
            };
            let tools = self.tools(family);
            specs.push((
                tools.clone(),
                render::nat_spec(config.masquerade.then_some(&params)),
            ));
            specs.push((tools, render::filter_spec(Some(cluster_cidr))));
        }
        let unchanged = specs == self.written && self.plane == Some(Plane::IpTables);
        if unchanged && !check {
            return Ok(());
        }
        for (tools, spec) in &specs {
            if apply(tools, spec).await? {
                outcome.rewritten.push(spec.table);
                if unchanged {
                    outcome.repaired.push(spec.table);
                }
            }
        }
        // A family the node no longer has loses its rules (ip6tables may be
        // missing altogether on an IPv4 node).
        for gone in Family::ALL {
            let base = self.tools(gone).base;
            if families.iter().any(|f| f.0 == gone)
                || !self.written.iter().any(|(t, _)| t.base == base)
            {
                continue;
            }
            let tools = self.tools(gone);
            for spec in [render::nat_spec(None), render::filter_spec(None)] {
                if apply(&tools, &spec).await? {
                    outcome.rewritten.push(spec.table);
                }
            }
        }
        self.written = specs;
        Ok(())
    }

    async fn sync_nft(
        &mut self,
        config: &RulesConfig,
        check: bool,
        outcome: &mut Outcome,
    ) -> Result<(), IptablesError> {
        let families: Vec<nft::FamilyNets> = config
            .families()
            .into_iter()
            .map(|(_, cluster, node)| nft::FamilyNets { cluster, node })
            .collect();
        let desired = nft::ruleset(&families, config.masquerade);
        let unchanged = self.written_nft.as_ref() == Some(&desired);
        if unchanged && !check {
            return Ok(());
        }
        let Some(table) = self.nft_table() else {
            return Err(nft_error("nftables is not available to this keeper"));
        };
        if check {
            table.invalidate();
        }
        let (plan, _, _) = table
            .apply(&desired)
            .await
            .map_err(|e| nft_error(&e.to_string()))?;
        if !plan.is_empty() {
            outcome.rewritten.push("nft");
            if unchanged {
                outcome.repaired.push("nft");
            }
        }
        self.written_nft = Some(desired);
        Ok(())
    }

    /// Removes canal's masquerade rules from the dataplane not in use.
    async fn clear_other(
        &mut self,
        plane: Plane,
        support: NodeSupport,
        outcome: &mut Outcome,
    ) -> Result<(), IptablesError> {
        match plane {
            Plane::IpTables => {
                self.written_nft = None;
                if support.nftables
                    && let Some(t) = self.nft_table()
                    && t.remove().await.map_err(|e| nft_error(&e.to_string()))?
                {
                    outcome.rewritten.push("nft");
                }
            }
            Plane::NfTables => {
                self.written.clear();
                for family in Family::ALL {
                    let tools = self.tools(family);
                    for spec in [render::nat_spec(None), render::filter_spec(None)] {
                        match apply(&tools, &spec).await {
                            Ok(true) => outcome.rewritten.push(spec.table),
                            Ok(false) => {}
                            // No ip6tables on this node: nothing of canal's there.
                            Err(e) if family == Family::V6 && e.step == Step::Save => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Re-checks what was written last; returns the tables rewritten.
    async fn repair(&mut self) -> Result<Vec<&'static str>, IptablesError> {
        let mut rewritten = Vec::new();
        for (tools, spec) in self.written.clone() {
            if apply(&tools, &spec).await? {
                rewritten.push(spec.table);
            }
        }
        if let Some(desired) = self.written_nft.clone()
            && let Some(table) = self.nft_table()
        {
            table.invalidate();
            let (plan, _, _) = table
                .apply(&desired)
                .await
                .map_err(|e| nft_error(&e.to_string()))?;
            if !plan.is_empty() {
                rewritten.push("nft");
            }
        }
        Ok(rewritten)
    }
}

fn nft_error(message: &str) -> IptablesError {
    IptablesError {
        step: Step::Nft,
        table: nft::TABLE,
        message: message.to_string(),
    }
}

/// Reads `spec`'s table and rewrites what differs; true when it wrote.
async fn apply(tools: &Iptables, spec: &ChainSpec) -> Result<bool, IptablesError> {
    let save = tools.save(spec.table).await?;
    let found = render::find(&save, spec);
    let Some(text) = render::plan(&found, spec) else {
        return Ok(false);
    };
    tracing::debug!(table = spec.table, "iptables-restore:\n{text}");
    tools.restore(spec.table, &text).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_overlay_chains_concern_the_keeper() {
        let c = |table: &str, chain: Option<&str>| Change::Nft {
            family: 2,
            table: table.into(),
            object: ObjectKind::Rule,
            chain: chain.map(String::from),
        };
        assert!(concerns_masquerade(&c("nat", Some("POSTROUTING"))));
        assert!(concerns_masquerade(&c("nat", Some("CANAL-MASQ"))));
        assert!(concerns_masquerade(&c("filter", Some("CANAL-FWD-ALLOW"))));
        assert!(concerns_masquerade(&c("filter", None)));
        assert!(concerns_masquerade(&Change::Lost));
        assert!(!concerns_masquerade(&c("filter", Some("CANAL-FORWARD"))));
        assert!(!concerns_masquerade(&c("nat", Some("KUBE-POSTROUTING"))));
        assert!(!concerns_masquerade(&c("raw", None)));
    }
}
