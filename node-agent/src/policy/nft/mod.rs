//! The nftables dataplane: canal's own table `inet canal` (policy and
//! anti-spoofing, [`render`]) and `inet canal-masq` (masquerade,
//! [`crate::masq::nft`]), each changed by one atomic transaction per sync
//! that touches only what differs ([`ruleset::plan`]), read back only on
//! start, drift checks and after a failure ([`state`]), run in-process
//! through libnftables ([`libnft`]).
//!
//! No other table is ever read or written: `iptables -F` or a firewall
//! reload that rewrites the iptables tables leaves canal's table alone, a
//! foreign base chain that accepts cannot undo canal's drops, and a change
//! to canal's table by someone else (`nft flush ruleset`, a deleted rule or
//! element) is notified ([`crate::policy::watch`]) and repaired at once.

pub mod base_chains;
pub mod cache;
pub mod libnft;
pub mod netlink;
pub mod render;
#[cfg(test)]
mod render_tests;
pub mod ruleset;
pub mod state;

use std::collections::BTreeMap;

pub use libnft::{NftError, Runner};
pub use ruleset::{NftPlan, NftPlanStats, NftRuleset};
pub use state::NftState;

/// One of canal's nftables tables in one network namespace.
#[derive(Debug)]
pub struct NftTable {
    runner: Runner,
    table: String,
    /// What the kernel holds, as far as we know; None: read it first.
    known: Option<NftState>,
    /// Transactions sent as nfnetlink element batches ([`netlink`]).
    batches: u64,
}

impl NftTable {
    /// The table `name` (family inet), programmed through `runner`.
    pub fn new(runner: Runner, name: &str) -> NftTable {
        NftTable {
            runner,
            table: name.to_string(),
            known: None,
            batches: 0,
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.table
    }

    /// How scripts run (`library` or `process`).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// What the kernel holds, read now (absent when the table does not exist).
    pub async fn read(&self) -> Result<NftState, NftError> {
        let cmd = format!("list table {} {}", ruleset::FAMILY, self.table);
        match self.runner.list_json(&cmd).await {
            Ok(json) => {
                NftState::parse(&self.table, &json).map_err(|e| NftError::Failed(e.to_string()))
            }
            Err(NftError::Failed(msg)) if msg.contains("No such file or directory") => {
                Ok(NftState::absent(&self.table))
            }
            Err(e) => Err(e),
        }
    }

    /// How many transactions went as nfnetlink element batches.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Whether the last state is known (no read needed before the next plan).
    pub fn is_known(&self) -> bool {
        self.known.is_some()
    }

    /// Forgets what was applied: the next apply reads the kernel first.
    pub fn invalidate(&mut self) {
        self.known = None;
    }

    /// Brings the table to `desired` in one transaction. Returns the plan
    /// that ran (empty: the kernel already matched), whether the kernel
    /// was read first, and the time the diff took.
    pub async fn apply(
        &mut self,
        desired: &NftRuleset,
    ) -> Result<(NftPlan, bool, std::time::Duration), NftError> {
        let (known, read) = match self.known.take() {
            Some(k) => (k, false),
            None => (self.read().await?, true),
        };
        let plan_start = std::time::Instant::now();
        let plan = ruleset::plan(&known, desired);
        let plan_time = plan_start.elapsed();
        if plan.is_empty() {
            self.known = Some(known);
            return Ok((plan, read, plan_time));
        }
        tracing::debug!(table = %self.table, changes = ?plan.stats, "nft transaction");
        let after = NftState::from_ruleset(desired);
        // Members only: one nfnetlink batch, no libnftables cache refresh.
        let fast = match netlink::element_only_delta(&known, &after) {
            Some(deltas) if !deltas.is_empty() => {
                self.runner.run_elements(&self.table, &deltas).await?
            }
            _ => false,
        };
        if fast {
            self.batches += 1;
        } else {
            self.runner.run(&plan.script).await?;
        }
        self.known = Some(after);
        Ok((plan, read, plan_time))
    }

    /// Deletes the table if it exists; returns whether it did.
    pub async fn remove(&mut self) -> Result<bool, NftError> {
        let state = match self.known.take() {
            Some(k) => k,
            None => self.read().await?,
        };
        let removed = if state.exists {
            let script = format!("delete table {} {}\n", ruleset::FAMILY, self.table);
            self.runner.run(&script).await?;
            true
        } else {
            false
        };
        self.known = Some(NftState::absent(&self.table));
        Ok(removed)
    }

    /// Packet counters of canal's rules in `chain`, by rule hash.
    pub async fn counters(&self, chain: &str) -> Result<BTreeMap<String, u64>, NftError> {
        let cmd = format!("list chain {} {} {chain}", ruleset::FAMILY, self.table);
        let json = self.runner.list_json(&cmd).await?;
        Ok(state::rule_packet_counts(&json))
    }
}
