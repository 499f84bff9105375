//! Masquerade and FORWARD-accept rules of the overlay (nat `CANAL-MASQ`,
//! filter `CANAL-FWD-ALLOW`). [`render`] decides; this shell reads the
//! tables with `iptables-save` and writes with one
//! `iptables-restore --noflush --wait` batch per table, only when something
//! differs.
//!
//! The agent's loop checks the rules on every resync; in between, a keeper
//! in the agent's own namespace listens to nf_tables change notifications
//! ([`crate::policy::watch`]) and repairs the rules within milliseconds
//! when another program changes `POSTROUTING`, `FORWARD` or canal's chains
//! (a firewall reload), ignoring the agent's own writes.

pub mod render;

use std::ffi::OsString;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::Mutex;

use crate::policy::watch::{self, Change, ObjectKind};
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
}

impl Step {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Save => "save",
            Step::Restore => "restore",
            Step::Version => "version",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Save => "iptables-save",
            Step::Restore => "iptables-restore",
            Step::Version => "iptables --version",
        })
    }
}

/// Runs the iptables tools, optionally behind a command prefix (tests use
/// `ip netns exec <ns>`).
#[derive(Clone, Debug, Default)]
pub struct Iptables {
    prefix: Vec<OsString>,
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
        }
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
        let mut cmd = self.command("iptables-save");
        cmd.args(["-t", table]);
        self.output(cmd, Step::Save, table, None).await
    }

    /// `iptables-restore --noflush --wait` with `text` on stdin.
    pub async fn restore(&self, table: &'static str, text: &str) -> Result<(), IptablesError> {
        let mut cmd = self.command("iptables-restore");
        cmd.args(["--noflush", "--wait"]);
        self.output(cmd, Step::Restore, table, Some(text))
            .await
            .map(drop)
    }

    /// Whether this iptables supports `--random-fully`.
    pub async fn random_fully(&self) -> Result<bool, IptablesError> {
        let mut cmd = self.command("iptables");
        cmd.arg("--version");
        let out = self.output(cmd, Step::Version, "-", None).await?;
        Ok(render::supports_random_fully(&out))
    }
}

/// What the overlay's rules should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RulesConfig {
    /// clusterCIDR.
    pub cluster_cidr: Ipv4Net,
    /// This node's pod subnet.
    pub node_subnet: Ipv4Net,
    /// CanalNetwork `masquerade`.
    pub masquerade: bool,
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
    random_fully: Option<bool>,
    written: Vec<ChainSpec>,
}

/// Wait after the first foreign change before repairing (a reload is a burst).
const SETTLE: Duration = Duration::from_millis(20);

impl Masquerade {
    /// A keeper using `iptables`. With the tools of the agent's own
    /// namespace (no prefix) it also repairs the rules as soon as another
    /// program changes them.
    pub fn new(iptables: Iptables) -> Masquerade {
        let auto_repair = iptables.prefix.is_empty();
        Masquerade {
            inner: Arc::new(Mutex::new(Keeper {
                iptables,
                random_fully: None,
                written: Vec::new(),
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
            if *family != crate::policy::nfnl::FAMILY_IPV4 || *object == ObjectKind::Set {
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
    async fn sync(&mut self, config: &RulesConfig, check: bool) -> Result<Outcome, IptablesError> {
        let random_fully = match self.random_fully {
            Some(r) => r,
            None => {
                let r = self.iptables.random_fully().await?;
                self.random_fully = Some(r);
                r
            }
        };
        let params = MasqParams {
            cluster_cidr: config.cluster_cidr,
            node_subnet: config.node_subnet,
            random_fully,
        };
        let specs = vec![
            render::nat_spec(config.masquerade.then_some(&params)),
            render::filter_spec(Some(config.cluster_cidr)),
        ];
        let unchanged = specs == self.written;
        let mut outcome = Outcome::default();
        if unchanged && !check {
            return Ok(outcome);
        }
        for spec in &specs {
            if self.apply(spec).await? {
                outcome.rewritten.push(spec.table);
                if unchanged {
                    outcome.repaired.push(spec.table);
                }
            }
        }
        self.written = specs;
        Ok(outcome)
    }

    /// Re-checks what was written last; returns the tables rewritten.
    async fn repair(&mut self) -> Result<Vec<&'static str>, IptablesError> {
        let mut rewritten = Vec::new();
        for spec in self.written.clone() {
            if self.apply(&spec).await? {
                rewritten.push(spec.table);
            }
        }
        Ok(rewritten)
    }

    /// Reads `spec`'s table and rewrites what differs; true when it wrote.
    async fn apply(&self, spec: &ChainSpec) -> Result<bool, IptablesError> {
        let save = self.iptables.save(spec.table).await?;
        let found = render::find(&save, spec);
        let Some(text) = render::plan(&found, spec) else {
            return Ok(false);
        };
        tracing::debug!(table = spec.table, "iptables-restore:\n{text}");
        self.iptables.restore(spec.table, &text).await?;
        Ok(true)
    }
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
