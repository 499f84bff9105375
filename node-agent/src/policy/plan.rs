//! The kernel-state diff: from what the kernel holds to what the ruleset
//! wants, as at most three batches (pure text, no I/O):
//!
//! 1. `ipset restore` (pre): create new sets, member deltas, swaps; so every
//!    set a rule will reference exists and is filled before the rule does.
//! 2. `iptables-restore --noflush`: one transaction per table (raw, filter,
//!    security; the guard in security goes in last and comes out first)
//!    that declares (and so flushes) every new, changed or stale chain,
//!    writes the changed chains in full, fixes the hooks and deletes stale
//!    chains with `-X` last. The kernel swaps each in atomically, so a
//!    changed endpoint chain is never seen half-written or missing.
//! 3. `ipset restore` (post): destroy sets no rule references any more.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::names;
use super::ruleset::{Ruleset, SET_MAXELEM, Table};
use super::state::KernelState;

/// What a plan changes, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Chains created or rewritten.
    pub chains_written: usize,
    /// Stale chains deleted.
    pub chains_deleted: usize,
    /// Rules written (in written chains and hooks).
    pub rules_written: usize,
    /// Built-in chains whose hook was (re)inserted or removed.
    pub hooks_fixed: usize,
    /// Sets created (including re-created after a type conflict).
    pub sets_created: usize,
    /// Sets replaced through a temporary set and `swap`.
    pub sets_swapped: usize,
    /// Stale sets destroyed.
    pub sets_destroyed: usize,
    /// Members added to existing sets.
    pub members_added: usize,
    /// Members removed from existing sets.
    pub members_removed: usize,
}

/// The batches that bring the kernel from one state to the ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `ipset restore` input run first (empty: nothing to do).
    pub ipset_pre: String,
    /// `iptables-restore --noflush` input (empty: nothing to do).
    pub iptables: String,
    /// `ipset restore` input run last.
    pub ipset_post: String,
    /// Counts.
    pub stats: PlanStats,
    /// Names of the chains written (created or rewritten), sorted.
    pub written_chains: Vec<String>,
}

impl Plan {
    /// True when the kernel already matches.
    pub fn is_empty(&self) -> bool {
        self.ipset_pre.is_empty() && self.iptables.is_empty() && self.ipset_post.is_empty()
    }
}

/// Computes the batches that turn `current` into `desired`.
pub fn plan(current: &KernelState, desired: &Ruleset) -> Plan {
    let mut stats = PlanStats::default();
    let (ipset_pre, ipset_post) = plan_sets(current, desired, &mut stats);
    let mut written_chains = Vec::new();
    let iptables = plan_iptables(current, desired, &mut stats, &mut written_chains);
    Plan {
        ipset_pre,
        iptables,
        ipset_post,
        stats,
        written_chains,
    }
}

fn plan_sets(current: &KernelState, desired: &Ruleset, stats: &mut PlanStats) -> (String, String) {
    let mut pre = String::new();
    let mut post = String::new();
    let mut temp_destroyed = Vec::new();
    for (name, want) in &desired.sets {
        let create_args = want.create_args();
        match current.sets.get(name) {
            None => {
                stats.sets_created += 1;
                let _ = writeln!(pre, "create {name} {create_args}");
                for m in want.members.iter() {
                    let _ = writeln!(pre, "add {name} {m}");
                }
            }
            Some(have) if have.set_type == want.set_type.as_str() => {
                if have.maxelem == Some(SET_MAXELEM) {
                    if std::sync::Arc::ptr_eq(&have.members, &want.members) {
                        // The set applied last time, unchanged: nothing to diff.
                        continue;
                    }
                    for m in have.members.difference(&want.members) {
                        stats.members_removed += 1;
                        let _ = writeln!(pre, "del {name} {}", strip_flags(m));
                    }
                    for m in want.members.difference(&have.members) {
                        stats.members_added += 1;
                        let _ = writeln!(pre, "add {name} {m}");
                    }
                } else {
                    // Same type, other metadata: fill a temporary set and swap it in,
                    // so rules referencing the name never see it empty.
                    stats.sets_swapped += 1;
                    let temp = names::temp_set_name(name);
                    if current.sets.contains_key(&temp) {
                        let _ = writeln!(pre, "destroy {temp}");
                        temp_destroyed.push(temp.clone());
                    }
                    let _ = writeln!(pre, "create {temp} {create_args}");
                    for m in want.members.iter() {
                        let _ = writeln!(pre, "add {temp} {m}");
                    }
                    let _ = writeln!(pre, "swap {temp} {name}");
                    let _ = writeln!(pre, "destroy {temp}");
                }
            }
            Some(_) => {
                // Another type under our name (made by hand: our names hash the
                // type). Sets of different types cannot be swapped; replace it.
                // This fails, and is reported, if some rule still references it.
                stats.sets_created += 1;
                let _ = writeln!(pre, "destroy {name}");
                let _ = writeln!(pre, "create {name} {create_args}");
                for m in want.members.iter() {
                    let _ = writeln!(pre, "add {name} {m}");
                }
            }
        }
    }
    for name in current.sets.keys() {
        if !desired.sets.contains_key(name) && !temp_destroyed.contains(name) {
            stats.sets_destroyed += 1;
            let _ = writeln!(post, "destroy {name}");
        }
    }
    (pre, post)
}

/// `del` takes the element without flags such as `nomatch`.
fn strip_flags(member: &str) -> &str {
    member.split_whitespace().next().unwrap_or(member)
}

fn plan_iptables(
    current: &KernelState,
    desired: &Ruleset,
    stats: &mut PlanStats,
    written: &mut Vec<String>,
) -> String {
    let mut tables: BTreeSet<Table> = desired.tables();
    tables.extend(current.chains.keys().filter_map(|n| names::chain_table(n)));
    tables.extend(current.hooks.keys().map(|(t, _)| *t));
    // The guard (security) needs the filter table's verdict marks: it goes
    // in after the filter chains that set them and out before them, so no
    // transaction in between drops allowed traffic.
    let guard_wanted = desired.tables().contains(&Table::Security);
    let mut order: Vec<Table> = tables.into_iter().collect();
    if !guard_wanted {
        order.sort_by_key(|t| *t != Table::Security);
    }
    let mut out = String::new();
    for table in order {
        out.push_str(&plan_table(table, current, desired, stats, written));
    }
    out
}

/// One table's transaction (empty when the table is in sync).
fn plan_table(
    table: Table,
    current: &KernelState,
    desired: &Ruleset,
    stats: &mut PlanStats,
    written: &mut Vec<String>,
) -> String {
    let mut declare = String::new();
    let mut rules = String::new();
    let mut hooks = String::new();
    let mut delete = String::new();

    for (name, chain) in desired.table_chains(table) {
        let in_sync = current.chains.get(name).is_some_and(|have| {
            have.len() == chain.rules.len()
                && have
                    .iter()
                    .zip(chain.rules.iter())
                    .all(|(h, r)| h.as_deref() == Some(r.hash.as_str()))
        });
        if in_sync {
            continue;
        }
        stats.chains_written += 1;
        stats.rules_written += chain.rules.len();
        written.push(name.clone());
        let _ = writeln!(declare, ":{name} - [0:0]");
        for r in chain.rules.iter() {
            let _ = writeln!(rules, "-A {name} {}", r.args());
        }
    }
    for name in current.chains.keys() {
        if names::chain_table(name) == Some(table) && !desired.chains.contains_key(name) {
            stats.chains_deleted += 1;
            // Declaring flushes it, so its own jumps to other stale chains are
            // gone before any `-X`.
            let _ = writeln!(declare, ":{name} - [0:0]");
            let _ = writeln!(delete, "-X {name}");
        }
    }

    let mut builtins: Vec<&str> = desired
        .hooks
        .iter()
        .filter(|h| h.table == table)
        .map(|h| h.builtin)
        .collect();
    builtins.extend(
        current
            .hooks
            .keys()
            .filter(|(t, _)| *t == table)
            .map(|(_, b)| b.as_str()),
    );
    builtins.sort_unstable();
    builtins.dedup();
    for builtin in builtins {
        let want = desired
            .hooks
            .iter()
            .find(|h| h.table == table && h.builtin == builtin);
        let have = current
            .hooks
            .get(&(table, builtin.to_string()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let in_sync = match want {
            Some(h) => {
                have.len() == 1
                    && have[0].position == 1
                    && have[0].hash.as_deref() == Some(h.rule.hash.as_str())
            }
            None => have.is_empty(),
        };
        if in_sync {
            continue;
        }
        stats.hooks_fixed += 1;
        for h in have {
            let _ = writeln!(hooks, "-D {builtin} {}", h.args);
        }
        if let Some(h) = want {
            stats.rules_written += 1;
            let _ = writeln!(hooks, "-I {builtin} 1 {}", h.rule.args());
        }
    }

    if declare.is_empty() && hooks.is_empty() {
        return String::new();
    }
    format!("*{table}\n{declare}{rules}{hooks}{delete}COMMIT\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ruleset::{Chain, Hook, IpSet, SetType};

    fn ruleset(chains: &[(&str, &[&str])], sets: &[(&str, &[&str])]) -> Ruleset {
        let mut r = Ruleset::default();
        for (name, specs) in chains {
            let mut c = Chain::default();
            for s in *specs {
                c.push(name, *s, "");
            }
            r.chains.insert(name.to_string(), c);
        }
        for (name, members) in sets {
            let mut s = IpSet::new(SetType::HashNet);
            s.members = std::sync::Arc::new(members.iter().map(|m| m.to_string()).collect());
            r.sets.insert(name.to_string(), s);
        }
        let mut h = Chain::default();
        h.push("FORWARD", "-j CANAL-FORWARD", "");
        r.hooks.push(Hook {
            table: Table::Filter,
            builtin: "FORWARD",
            rule: h.rules[0].clone(),
        });
        r
    }

    #[test]
    fn nothing_to_do_when_in_sync() {
        let r = ruleset(
            &[
                ("CANAL-FORWARD", &["-j CANAL-TO-WL"]),
                ("CANAL-TO-WL", &["-j DROP"]),
            ],
            &[("canal-a", &["10.0.0.1"])],
        );
        let p = plan(&KernelState::from_ruleset(&r), &r);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.stats, PlanStats::default());
    }

    #[test]
    fn changed_chain_and_set_delta_only() {
        let old = ruleset(
            &[
                ("CANAL-FORWARD", &["-j CANAL-TO-WL"]),
                ("CANAL-TO-WL", &["-j DROP"]),
            ],
            &[("canal-a", &["10.0.0.1", "10.0.0.2"])],
        );
        let new = ruleset(
            &[
                ("CANAL-FORWARD", &["-j CANAL-TO-WL"]),
                ("CANAL-TO-WL", &["-o cali1 -g CANAL-TW-cali1", "-j DROP"]),
                ("CANAL-TW-cali1", &["-j RETURN"]),
            ],
            &[("canal-a", &["10.0.0.2", "10.0.0.3"])],
        );
        let p = plan(&KernelState::from_ruleset(&old), &new);
        assert_eq!(p.ipset_pre, "del canal-a 10.0.0.1\nadd canal-a 10.0.0.3\n");
        assert!(p.ipset_post.is_empty());
        let lines: Vec<&str> = p.iptables.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert_eq!(lines[1], ":CANAL-TO-WL - [0:0]");
        assert_eq!(lines[2], ":CANAL-TW-cali1 - [0:0]");
        assert!(lines[3].starts_with("-A CANAL-TO-WL "));
        assert!(
            !p.iptables.contains("CANAL-FORWARD"),
            "unchanged chain rewritten"
        );
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert_eq!(p.stats.chains_written, 2);
        assert_eq!(p.stats.members_added, 1);
        assert_eq!(p.stats.members_removed, 1);
    }

    #[test]
    fn stale_chains_and_sets_removed_after_references() {
        let old = ruleset(
            &[
                ("CANAL-TW-cali1", &["-j CANAL-PI-0000000000000000"]),
                (
                    "CANAL-PI-0000000000000000",
                    &["-m set --match-set canal-a src -j ACCEPT"],
                ),
            ],
            &[("canal-a", &["10.0.0.1 nomatch"])],
        );
        let mut new = ruleset(&[("CANAL-TW-cali1", &["-j RETURN"])], &[]);
        new.hooks.clear();
        let p = plan(&KernelState::from_ruleset(&old), &new);
        let text = &p.iptables;
        let flush = text.find(":CANAL-PI-0000000000000000 - [0:0]").unwrap();
        let rewrite = text.find("-A CANAL-TW-cali1").unwrap();
        let unhook = text.find("-D FORWARD").unwrap();
        let delete = text.find("-X CANAL-PI-0000000000000000").unwrap();
        assert!(
            flush < rewrite && rewrite < delete && unhook < delete,
            "{text}"
        );
        assert!(p.ipset_pre.is_empty());
        assert_eq!(p.ipset_post, "destroy canal-a\n");
        assert_eq!(p.stats.chains_deleted, 1);
        assert_eq!(p.stats.sets_destroyed, 1);
    }

    #[test]
    fn hook_moved_to_the_top_and_duplicates_removed() {
        let r = ruleset(&[("CANAL-FORWARD", &["-j DROP"])], &[]);
        let mut k = KernelState::from_ruleset(&r);
        let key = (Table::Filter, "FORWARD".to_string());
        let hook = k.hooks.get_mut(&key).unwrap();
        hook[0].position = 2;
        let p = plan(&k, &r);
        let args = r.hooks[0].rule.args();
        assert_eq!(
            p.iptables,
            format!("*filter\n-D FORWARD {args}\n-I FORWARD 1 {args}\nCOMMIT\n")
        );
        let mut k = KernelState::from_ruleset(&r);
        let dup = k.hooks[&key][0].clone();
        k.hooks
            .get_mut(&key)
            .unwrap()
            .push(crate::policy::state::HookState { position: 5, ..dup });
        let p = plan(&k, &r);
        assert_eq!(p.iptables.matches("-D FORWARD").count(), 2);
        assert_eq!(p.stats.hooks_fixed, 1);
    }

    #[test]
    fn foreign_rule_in_our_chain_forces_rewrite() {
        let r = ruleset(&[("CANAL-FORWARD", &["-j DROP"])], &[]);
        let mut k = KernelState::from_ruleset(&r);
        k.chains.get_mut("CANAL-FORWARD").unwrap().insert(0, None);
        let p = plan(&k, &r);
        assert!(p.iptables.contains(":CANAL-FORWARD - [0:0]"));
    }

    #[test]
    fn set_metadata_change_swaps_and_type_change_recreates() {
        let r = ruleset(&[], &[("canal-a", &["10.0.0.1"])]);
        let mut k = KernelState::from_ruleset(&r);
        k.sets.get_mut("canal-a").unwrap().maxelem = Some(65536);
        let p = plan(&k, &r);
        let temp = names::temp_set_name("canal-a");
        assert!(
            p.ipset_pre
                .contains(&format!("swap {temp} canal-a\ndestroy {temp}\n"))
        );
        assert_eq!(p.stats.sets_swapped, 1);

        let mut k = KernelState::from_ruleset(&r);
        k.sets.get_mut("canal-a").unwrap().set_type = "hash:ip".into();
        let p = plan(&k, &r);
        assert!(
            p.ipset_pre
                .starts_with("destroy canal-a\ncreate canal-a hash:net")
        );
    }

    #[test]
    fn the_guard_goes_in_after_filter_and_out_before_it() {
        let mut r = ruleset(
            &[
                ("CANAL-FORWARD", &["-j DROP"]),
                ("CANAL-PREROUTING", &["-j RETURN"]),
                ("CANAL-GUARD-FORWARD", &["-j DROP"]),
            ],
            &[],
        );
        let p = plan(&KernelState::default(), &r);
        let at = |t: &str| {
            p.iptables
                .find(t)
                .unwrap_or_else(|| panic!("{t} in {}", p.iptables))
        };
        assert!(at("*raw") < at("*filter") && at("*filter") < at("*security"));
        assert_eq!(p.iptables.matches("COMMIT").count(), 3);
        let installed = KernelState::from_ruleset(&r);
        r.chains.remove("CANAL-GUARD-FORWARD");
        r.chains.insert("CANAL-FORWARD".into(), {
            let mut c = Chain::default();
            c.push("CANAL-FORWARD", "-j ACCEPT", "");
            c
        });
        let p = plan(&installed, &r);
        let at = |t: &str| {
            p.iptables
                .find(t)
                .unwrap_or_else(|| panic!("{t} in {}", p.iptables))
        };
        assert!(at("*security") < at("*filter"), "{}", p.iptables);
        assert!(p.iptables.contains("-X CANAL-GUARD-FORWARD"));
        assert!(!p.iptables.contains("*raw"), "raw is in sync");
    }

    #[test]
    fn nomatch_members_deleted_without_flag() {
        let old = ruleset(&[], &[("canal-a", &["10.0.0.0/8", "10.1.0.0/16 nomatch"])]);
        let new = ruleset(&[], &[("canal-a", &["10.0.0.0/8"])]);
        let p = plan(&KernelState::from_ruleset(&old), &new);
        assert_eq!(p.ipset_pre, "del canal-a 10.1.0.0/16\n");
    }
}
