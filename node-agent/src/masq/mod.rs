//! Masquerade and FORWARD-accept rules of the overlay (nat `CANAL-MASQ`,
//! filter `CANAL-FWD-ALLOW`). [`render`] decides; this shell reads the
//! tables with `iptables-save` and writes with one
//! `iptables-restore --noflush --wait` batch per table, only when something
//! differs.

pub mod render;

use std::ffi::OsString;
use std::process::Stdio;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

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
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .await
                .map_err(|e| err(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| err(e.to_string()))?;
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
#[derive(Debug)]
pub struct Masquerade {
    iptables: Iptables,
    random_fully: Option<bool>,
    written: Vec<ChainSpec>,
}

impl Masquerade {
    /// A keeper using `iptables`.
    pub fn new(iptables: Iptables) -> Masquerade {
        Masquerade {
            iptables,
            random_fully: None,
            written: Vec::new(),
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
            let save = self.iptables.save(spec.table).await?;
            let found = render::find(&save, spec);
            if let Some(text) = render::plan(&found, spec) {
                tracing::debug!(table = spec.table, "iptables-restore:\n{text}");
                self.iptables.restore(spec.table, &text).await?;
                outcome.rewritten.push(spec.table);
                if unchanged {
                    outcome.repaired.push(spec.table);
                }
            }
        }
        self.written = specs;
        Ok(outcome)
    }
}
