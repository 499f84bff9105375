//! canal's nftables table as plain data ([`NftRuleset`]: chains of hashed
//! rules, typed sets, verdict maps) and the pure diff that turns what the
//! kernel holds ([`NftState`]) into it: one script, applied as one atomic
//! transaction, touching only what differs (an element added or removed, a
//! chain flushed and refilled, a map entry moved), never another table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use crate::policy::antispoof::SpoofReason;
use crate::policy::ruleset::Rule;

use super::state::NftState;

/// The nftables family of canal's tables (both IP families in one table).
pub const FAMILY: &str = "inet";

/// How a base chain is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    /// `filter` or `nat`.
    pub kind: &'static str,
    /// `prerouting`, `input`, `forward`, `postrouting`.
    pub hook: &'static str,
    /// Priority (raw -300, filter 0, srcnat 100).
    pub priority: i32,
}

/// A chain: base (hooked) or regular, and its rules in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftChain {
    /// None: a regular chain (reached by jump, goto or a verdict map).
    pub base: Option<BaseChain>,
    /// The rules; `spec` is nft rule syntax without the comment.
    pub rules: Arc<Vec<Rule>>,
}

impl NftChain {
    /// Appends a rule (hash chained over its predecessors, as for iptables).
    pub fn push(&mut self, chain_name: &str, spec: impl Into<String>, note: &str) {
        let mut c = crate::policy::ruleset::Chain {
            rules: std::mem::take(&mut self.rules),
        };
        c.push(chain_name, spec, note);
        self.rules = c.rules;
    }
}

/// A named set or verdict map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftSet {
    /// Key type, e.g. `ipv4_addr`, `ifname . ipv6_addr`.
    pub key_type: String,
    /// `Some("verdict")` for a verdict map.
    pub data: Option<&'static str>,
    /// Whether the set holds intervals (prefixes).
    pub interval: bool,
    /// Elements in nft syntax as `nft -j list` gives them back after
    /// [`super::state`] spells them (`10.0.0.1`, `10.0.0.0/8`,
    /// `"cali0" . 10.0.0.1`, `"cali0" : jump tw-cali0`).
    pub elements: Arc<BTreeSet<String>>,
}

impl NftSet {
    /// An empty set of `key_type`.
    pub fn new(key_type: impl Into<String>) -> NftSet {
        NftSet {
            key_type: key_type.into(),
            data: None,
            interval: false,
            elements: Arc::new(BTreeSet::new()),
        }
    }

    /// An empty verdict map keyed by `key_type`.
    pub fn verdict_map(key_type: impl Into<String>) -> NftSet {
        NftSet {
            data: Some("verdict"),
            ..NftSet::new(key_type)
        }
    }

    /// With the interval flag.
    pub fn interval(mut self) -> NftSet {
        self.interval = true;
        self
    }

    /// Adds an element.
    pub fn insert(&mut self, element: String) {
        Arc::make_mut(&mut self.elements).insert(element);
    }

    /// `{ type ...; flags ...; }`.
    fn declaration(&self) -> String {
        let mut d = format!("{{ type {}", self.key_type);
        if let Some(data) = self.data {
            let _ = write!(d, " : {data}");
        }
        d.push(';');
        if self.interval {
            d.push_str(" flags interval;");
        }
        d.push_str(" }");
        d
    }

    /// Whether this is a verdict map.
    pub fn is_map(&self) -> bool {
        self.data.is_some()
    }
}

/// One of canal's tables, as it should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftRuleset {
    /// The table's name (`canal`, `canal-masq`).
    pub table: String,
    /// Chains by name.
    pub chains: BTreeMap<String, NftChain>,
    /// Sets and maps by name.
    pub sets: BTreeMap<String, NftSet>,
    /// Pod interfaces whose chains this ruleset programs (the handshake).
    pub endpoints: BTreeSet<String>,
    /// Anti-spoofing drop rules by hash, for the spoofed-packet counters.
    pub spoof_rules: BTreeMap<String, SpoofReason>,
}

impl NftRuleset {
    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }

    /// Number of set and map elements.
    pub fn element_count(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum()
    }

    /// The whole table as one script into a kernel that has none of it (a
    /// cold start; also the golden-test form).
    pub fn script(&self) -> String {
        plan(&NftState::absent(&self.table), self).script
    }
}

/// The comment of a rule: `canal:<hash> <note>` within nft's 128 bytes.
pub fn comment(rule: &Rule) -> String {
    let mut c = rule.comment();
    c.truncate(120);
    c
}

/// What a plan changes, for logs, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NftPlanStats {
    /// Chains created or rewritten.
    pub chains_written: usize,
    /// Stale chains deleted.
    pub chains_deleted: usize,
    /// Rules written.
    pub rules_written: usize,
    /// Sets (and maps) created, including re-created after a type change.
    pub sets_created: usize,
    /// Stale sets deleted.
    pub sets_destroyed: usize,
    /// Elements added to existing sets.
    pub elements_added: usize,
    /// Elements removed from existing sets.
    pub elements_removed: usize,
    /// The table was created.
    pub table_created: bool,
}

/// One transaction that brings the table from a state to a ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftPlan {
    /// The script (empty: nothing to do).
    pub script: String,
    /// Counts.
    pub stats: NftPlanStats,
    /// Chains written, sorted.
    pub written_chains: Vec<String>,
}

impl NftPlan {
    /// True when the kernel already matches.
    pub fn is_empty(&self) -> bool {
        self.script.is_empty()
    }
}

/// The key of a map element (`"cali0" : jump x` -> `"cali0"`), or the
/// element itself.
fn element_key(e: &str) -> &str {
    e.split_once(" : ").map_or(e, |(k, _)| k)
}

/// Computes the transaction that turns `current` into `desired`. The order
/// inside it keeps every reference valid at every step: sets and chains
/// exist before rules use them, rules are gone before what they used is
/// deleted.
pub fn plan(current: &NftState, desired: &NftRuleset) -> NftPlan {
    let t = format!("{FAMILY} {}", desired.table);
    let mut stats = NftPlanStats::default();
    let mut written = Vec::new();
    // Sections, concatenated in this order.
    let mut sets = String::new();
    let mut declare = String::new();
    let mut flush = String::new();
    let mut rules = String::new();
    let mut base_rules = String::new();
    let mut maps = String::new();
    let mut delete_chains = String::new();
    let mut delete_sets = String::new();
    let mut flush_sets = String::new();

    if !current.exists {
        stats.table_created = true;
    }
    // Sets first (rules reference them); verdict maps' elements after the
    // chains they jump to.
    let mut recreated: BTreeSet<&str> = BTreeSet::new();
    let mut recreate = String::new();
    for (name, want) in &desired.sets {
        let have = current.sets.get(name);
        let fresh = match have {
            None => true,
            Some(h) => {
                h.key_type != want.key_type || h.data != want.data || h.interval != want.interval
            }
        };
        if fresh {
            stats.sets_created += 1;
            if let Some(h) = have {
                // Another type under our name: only a hand-made set can be
                // that. Replace it once the rules using it are flushed
                // (they are rewritten after it).
                recreated.insert(name);
                let verb = if h.data.is_some() { "map" } else { "set" };
                let _ = writeln!(flush_sets, "delete {verb} {t} {name}");
            }
            let decl = if have.is_some() {
                &mut recreate
            } else {
                &mut sets
            };
            let _ = writeln!(decl, "add {} {t} {name} {}", kind(want), want.declaration());
            if !want.elements.is_empty() {
                let out = if want.is_map() || have.is_some() {
                    &mut maps
                } else {
                    &mut sets
                };
                write_elements(
                    out,
                    "add",
                    &t,
                    name,
                    want.elements.iter().map(String::as_str),
                );
            }
            continue;
        }
        let out = if want.is_map() { &mut maps } else { &mut sets };
        let Some(have) = have else { continue };
        if Arc::ptr_eq(&have.elements, &want.elements) {
            continue;
        }
        // Map entries are removed by key: a moved key is removed, then added.
        let removed: Vec<&str> = have
            .elements
            .difference(&want.elements)
            .map(|e| element_key(e))
            .collect();
        let added: Vec<&str> = want
            .elements
            .difference(&have.elements)
            .map(String::as_str)
            .collect();
        stats.elements_removed += removed.len();
        stats.elements_added += added.len();
        if !removed.is_empty() {
            write_elements(out, "delete", &t, name, removed.into_iter());
        }
        if !added.is_empty() {
            write_elements(out, "add", &t, name, added.into_iter());
        }
    }

    for (name, chain) in &desired.chains {
        let have = current.chains.get(name);
        let in_sync = have.is_some_and(|h| h.base == chain.base && h.rules.matches(&chain.rules))
            && !references_recreated(chain, &recreated);
        if in_sync {
            continue;
        }
        stats.chains_written += 1;
        stats.rules_written += chain.rules.len();
        written.push(name.clone());
        match have {
            Some(h) if h.base == chain.base => {
                let _ = writeln!(flush, "flush chain {t} {name}");
            }
            Some(_) => {
                // A base chain's hook cannot change in place: replace it.
                let _ = writeln!(flush, "delete chain {t} {name}");
                declare_chain(&mut declare, &t, name, chain);
            }
            None => declare_chain(&mut declare, &t, name, chain),
        }
        let out = if chain.base.is_some() {
            &mut base_rules
        } else {
            &mut rules
        };
        for r in chain.rules.iter() {
            let _ = writeln!(
                out,
                "add rule {t} {name} {} comment \"{}\"",
                r.spec,
                comment(r)
            );
        }
    }
    for name in current.chains.keys() {
        if !desired.chains.contains_key(name) {
            stats.chains_deleted += 1;
            // Flushed first, so its jumps to other stale chains are gone.
            let _ = writeln!(flush, "flush chain {t} {name}");
            let _ = writeln!(delete_chains, "delete chain {t} {name}");
        }
    }
    // A stale verdict map goes before the chains: its elements jump to
    // them, and the kernel refuses (EBUSY) to delete a chain still jumped
    // to. The rules using the map were flushed above.
    let mut delete_maps = String::new();
    for (name, set) in &current.sets {
        if !desired.sets.contains_key(name) {
            stats.sets_destroyed += 1;
            if set.data.is_some() {
                let _ = writeln!(delete_maps, "delete map {t} {name}");
            } else {
                let _ = writeln!(delete_sets, "delete set {t} {name}");
            }
        }
    }

    // A chain that references a re-created set is rewritten (flushed) too.
    let body = [
        sets,
        declare,
        flush,
        flush_sets,
        recreate,
        rules,
        maps,
        base_rules,
        delete_maps,
        delete_chains,
        delete_sets,
    ]
    .concat();
    if body.is_empty() && current.exists {
        return NftPlan::default();
    }
    written.sort();
    NftPlan {
        script: format!("add table {t}\n{body}"),
        stats,
        written_chains: written,
    }
}

fn kind(set: &NftSet) -> &'static str {
    if set.is_map() { "map" } else { "set" }
}

fn declare_chain(out: &mut String, t: &str, name: &str, chain: &NftChain) {
    match &chain.base {
        Some(b) => {
            let _ = writeln!(
                out,
                "add chain {t} {name} {{ type {} hook {} priority {}; policy accept; }}",
                b.kind, b.hook, b.priority
            );
        }
        None => {
            let _ = writeln!(out, "add chain {t} {name}");
        }
    }
}

/// Whether a chain's rules name a set that is being re-created (they must
/// be rewritten after it).
fn references_recreated(chain: &NftChain, recreated: &BTreeSet<&str>) -> bool {
    !recreated.is_empty()
        && chain
            .rules
            .iter()
            .any(|r| recreated.iter().any(|s| r.spec.contains(&format!("@{s}"))))
}

/// `add|delete element <t> <set> { a, b, ... }`, in batches of a few
/// thousand per command (one transaction either way).
fn write_elements<'a>(
    out: &mut String,
    verb: &str,
    t: &str,
    name: &str,
    elements: impl Iterator<Item = &'a str>,
) {
    let all: Vec<&str> = elements.collect();
    for chunk in all.chunks(4096) {
        let _ = writeln!(out, "{verb} element {t} {name} {{ {} }}", chunk.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::nft::state::ChainState;

    fn ruleset() -> NftRuleset {
        let mut r = NftRuleset {
            table: "canal".into(),
            ..NftRuleset::default()
        };
        let mut fwd = NftChain {
            base: Some(BaseChain {
                kind: "filter",
                hook: "forward",
                priority: 0,
            }),
            ..NftChain::default()
        };
        fwd.push("forward", "oifname vmap @to-wl", "dispatch");
        r.chains.insert("forward".into(), fwd);
        let mut tw = NftChain::default();
        tw.push("tw-cali1", "ip saddr @ps4-a accept", "");
        r.chains.insert("tw-cali1".into(), tw);
        let mut ps = NftSet::new("ipv4_addr");
        ps.insert("10.0.0.1".into());
        ps.insert("10.0.0.2".into());
        r.sets.insert("ps4-a".into(), ps);
        let mut m = NftSet::verdict_map("ifname");
        m.insert("\"cali1\" : jump tw-cali1".into());
        r.sets.insert("to-wl".into(), m);
        r
    }

    #[test]
    fn cold_script_declares_before_use() {
        let s = ruleset().script();
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in\n{s}"));
        assert!(s.starts_with("add table inet canal\n"));
        assert!(at("add set inet canal ps4-a") < at("add rule inet canal tw-cali1"));
        assert!(at("add chain inet canal tw-cali1") < at("add element inet canal to-wl"));
        assert!(at("add element inet canal to-wl") < at("add rule inet canal forward"));
        assert!(s.contains(
            "add chain inet canal forward { type filter hook forward priority 0; policy accept; }"
        ));
        assert!(s.contains("comment \"canal:"));
    }

    #[test]
    fn in_sync_is_empty_and_deltas_touch_only_what_changed() {
        let r = ruleset();
        let state = NftState::from_ruleset(&r);
        assert!(plan(&state, &r).is_empty());

        let mut changed = r.clone();
        let ps = changed.sets.get_mut("ps4-a").unwrap();
        Arc::make_mut(&mut ps.elements).remove("10.0.0.1");
        ps.insert("10.0.0.3".into());
        let p = plan(&state, &changed);
        assert_eq!(
            p.script,
            "add table inet canal\ndelete element inet canal ps4-a { 10.0.0.1 }\nadd element inet canal ps4-a { 10.0.0.3 }\n"
        );
        assert_eq!((p.stats.elements_added, p.stats.elements_removed), (1, 1));

        let mut rule = r.clone();
        let tw = rule.chains.get_mut("tw-cali1").unwrap();
        tw.push("tw-cali1", "drop", "");
        let p = plan(&state, &rule);
        assert!(p.script.contains("flush chain inet canal tw-cali1\n"));
        assert_eq!(p.written_chains, vec!["tw-cali1".to_string()]);
        assert!(!p.script.contains("forward"), "{}", p.script);
    }

    #[test]
    fn stale_objects_go_after_their_references() {
        let r = ruleset();
        let state = NftState::from_ruleset(&r);
        let mut gone = r.clone();
        gone.chains.remove("tw-cali1");
        gone.sets.remove("ps4-a");
        gone.sets.get_mut("to-wl").unwrap().elements = Arc::new(BTreeSet::new());
        let p = plan(&state, &gone);
        let s = &p.script;
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in\n{s}"));
        assert!(
            at("flush chain inet canal tw-cali1")
                < at("delete element inet canal to-wl { \"cali1\" }")
        );
        assert!(at("delete element inet canal to-wl") < at("delete chain inet canal tw-cali1"));
        assert!(at("delete chain inet canal tw-cali1") < at("delete set inet canal ps4-a"));
        assert_eq!(p.stats.chains_deleted, 1);
        assert_eq!(p.stats.sets_destroyed, 1);
    }

    #[test]
    fn a_stale_verdict_map_goes_before_the_chains_it_jumps_to() {
        // policy.enabled turned false: the maps, the endpoint chains and the
        // forward chain all go in one transaction; the kernel refuses to
        // delete a chain a map element still jumps to.
        let r = ruleset();
        let state = NftState::from_ruleset(&r);
        let mut off = r.clone();
        off.sets.remove("to-wl");
        off.chains.remove("tw-cali1");
        off.chains.remove("forward");
        let p = plan(&state, &off);
        let s = &p.script;
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in\n{s}"));
        assert!(at("flush chain inet canal forward") < at("delete map inet canal to-wl"));
        assert!(at("delete map inet canal to-wl") < at("delete chain inet canal tw-cali1"));
        assert!(at("delete map inet canal to-wl") < at("delete chain inet canal forward"));
    }

    #[test]
    fn a_foreign_rule_or_a_moved_hook_rewrites_the_chain() {
        let r = ruleset();
        let mut state = NftState::from_ruleset(&r);
        state
            .chains
            .get_mut("tw-cali1")
            .unwrap()
            .rules
            .to_mut()
            .insert(0, None);
        let p = plan(&state, &r);
        assert_eq!(p.written_chains, vec!["tw-cali1".to_string()]);
        let mut state = NftState::from_ruleset(&r);
        *state.chains.get_mut("forward").unwrap() = ChainState {
            base: Some(BaseChain {
                kind: "filter",
                hook: "forward",
                priority: 10,
            }),
            rules: vec![Some(r.chains["forward"].rules[0].hash.clone())].into(),
        };
        let p = plan(&state, &r);
        assert!(
            p.script.contains("delete chain inet canal forward\n"),
            "{}",
            p.script
        );
        assert!(
            p.script
                .contains("add chain inet canal forward { type filter hook forward priority 0")
        );
    }
}
