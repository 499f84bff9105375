//! The desired (or known) kernel state of policy enforcement as plain data:
//! filter chains with hashed rules, the hook rules in FORWARD/INPUT, and
//! ipsets with their members. Rendering it as `iptables-restore` / `ipset
//! restore` text is pure too, so golden tests pin the exact output.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use canal_crds::names::short_hash;

use super::names::COMMENT_PREFIX;

/// Most entries one canal set may hold (Felix's MaxIpsetSize default).
pub const SET_MAXELEM: u32 = 1_048_576;

/// One rule of a chain. `spec` is everything after the chain name except the
/// comment; `hash` identifies the rule *and everything before it in its
/// chain*, so a chain is unchanged exactly when its list of hashes is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 16 hex characters, carried in the rule's comment as `canal:<hash>`.
    pub hash: String,
    /// Human-readable note after the hash (may be empty).
    pub note: String,
    /// Matches and target, e.g. `-o cali0123456789a -g CANAL-TW-cali0123456789a`.
    pub spec: String,
}

impl Rule {
    /// The comment text: `canal:<hash>` plus the note, if any.
    pub fn comment(&self) -> String {
        if self.note.is_empty() {
            format!("{COMMENT_PREFIX}{}", self.hash)
        } else {
            format!("{COMMENT_PREFIX}{} {}", self.hash, self.note)
        }
    }

    /// The rule as iptables-restore arguments after `-A CHAIN` / `-I CHAIN 1`.
    pub fn args(&self) -> String {
        format!("-m comment --comment \"{}\" {}", self.comment(), self.spec)
    }
}

/// A filter chain and its rules, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// The rules (shared: an unchanged policy chain is reused between renders).
    pub rules: Arc<Vec<Rule>>,
}

impl Chain {
    /// Appends a rule; its hash chains over the chain name and every rule before it.
    pub fn push(&mut self, chain_name: &str, spec: impl Into<String>, note: &str) {
        let spec = spec.into();
        let note = sanitize_note(note);
        let prev = self.rules.last().map_or("", |r| r.hash.as_str());
        let hash = short_hash(&format!("{chain_name}\n{prev}\n{note}\n{spec}"));
        Arc::make_mut(&mut self.rules).push(Rule { hash, note, spec });
    }

    /// The rule hashes in order: what the kernel must show for the chain to be in sync.
    pub fn hashes(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.hash.clone()).collect()
    }
}

/// Notes end up inside a quoted iptables comment: keep them to characters
/// that need no escaping and within the 256-byte comment limit.
fn sanitize_note(note: &str) -> String {
    let mut s: String = note
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ./:,=_-()<>".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(200);
    s
}

/// The iptables tables canal's policy layers live in, in the order a
/// forwarded packet meets them: `raw` (anti-spoofing, before conntrack),
/// `filter` (NetworkPolicy), `security` (the fail-closed guard, after filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `raw`: PREROUTING runs before conntrack, so a dropped packet leaves no state.
    Raw,
    /// `filter`: the NetworkPolicy chains.
    Filter,
    /// `security`: runs after `filter` on the same hooks.
    Security,
}

impl Table {
    /// Every table, in packet order.
    pub const ALL: [Table; 3] = [Table::Raw, Table::Filter, Table::Security];

    /// The table's name (`iptables -t <name>`, nf_tables table `ip <name>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Filter => "filter",
            Table::Security => "security",
        }
    }

    /// Parses a table name.
    pub fn parse(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The built-in chains of the table that may hold canal's hooks.
    pub fn builtins(self) -> &'static [&'static str] {
        match self {
            Table::Raw => &["PREROUTING"],
            Table::Filter | Table::Security => &["INPUT", "FORWARD", "OUTPUT"],
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule in a built-in chain that sends packets into ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The table of the built-in chain.
    pub table: Table,
    /// `FORWARD`, `INPUT` or `PREROUTING`.
    pub builtin: &'static str,
    /// The hook rule (always at position 1).
    pub rule: Rule,
}

/// The ipset types canal uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetType {
    /// Addresses and CIDRs (PeerSet IPs, ipBlocks with except via `nomatch`).
    HashNet,
    /// (IP, protocol, port) triples (named ports).
    HashIpPort,
    /// (CIDR, interface) pairs (anti-spoofing: the sources each pod
    /// interface may send from), matched `src,src`.
    HashNetIface,
}

impl SetType {
    /// The ipset type name.
    pub fn as_str(self) -> &'static str {
        match self {
            SetType::HashNet => "hash:net",
            SetType::HashIpPort => "hash:ip,port",
            SetType::HashNetIface => "hash:net,iface",
        }
    }

    /// Parses an ipset type name.
    pub fn parse(s: &str) -> Option<SetType> {
        match s {
            "hash:net" => Some(SetType::HashNet),
            "hash:ip,port" => Some(SetType::HashIpPort),
            "hash:net,iface" => Some(SetType::HashNetIface),
            _ => None,
        }
    }
}

/// An ipset and its members, each spelled exactly as `ipset save` prints it
/// (`10.0.0.1`, `10.1.0.0/16 nomatch`, `10.0.0.1,tcp:80`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    /// The set's type.
    pub set_type: SetType,
    /// The members (shared: an unchanged PeerSet reuses the previous
    /// render's set, so diffing it against the applied state is a pointer compare).
    pub members: Arc<BTreeSet<String>>,
}

impl IpSet {
    /// An empty set of a type.
    pub fn new(set_type: SetType) -> IpSet {
        IpSet {
            set_type,
            members: Arc::new(BTreeSet::new()),
        }
    }

    /// Adds a member.
    pub fn insert(&mut self, member: String) {
        Arc::make_mut(&mut self.members).insert(member);
    }

    /// The `create` arguments after the name. `hashsize` is sized for the
    /// members so a large set is not rehashed while it is filled.
    pub fn create_args(&self) -> String {
        let hashsize = (self.members.len() / 4).next_power_of_two().max(1024);
        format!(
            "{} family inet hashsize {hashsize} maxelem {SET_MAXELEM}",
            self.set_type.as_str()
        )
    }
}

/// Everything policy enforcement wants in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Hook rules, one per built-in chain (of a table) at most.
    pub hooks: Vec<Hook>,
    /// Our chains by name; a chain's table follows from its name
    /// ([`names::chain_table`](super::names::chain_table)), so names are
    /// unique across tables.
    pub chains: BTreeMap<String, Chain>,
    /// Our sets by name.
    pub sets: BTreeMap<String, IpSet>,
    /// Pod interfaces whose endpoint chains this ruleset programs (none
    /// while policy is disabled); canal-cni waits for their handshake files.
    pub endpoints: BTreeSet<String>,
    /// Anti-spoofing rules that reference the spoofed-packet drops, for the
    /// `canal_policy_spoofed_packets_total` counters: rule hash -> reason.
    pub spoof_rules: BTreeMap<String, super::antispoof::SpoofReason>,
}

impl Ruleset {
    /// Number of iptables rules (hooks included).
    pub fn rule_count(&self) -> usize {
        self.hooks.len() + self.chains.values().map(|c| c.rules.len()).sum::<usize>()
    }

    /// Number of set members across every set.
    pub fn member_count(&self) -> usize {
        self.sets.values().map(|s| s.members.len()).sum()
    }

    /// The chains of one table.
    pub fn table_chains(&self, table: Table) -> impl Iterator<Item = (&String, &Chain)> {
        self.chains
            .iter()
            .filter(move |(n, _)| super::names::chain_table(n) == Some(table))
    }

    /// The tables this ruleset writes to.
    pub fn tables(&self) -> BTreeSet<Table> {
        let mut out: BTreeSet<Table> = self.hooks.iter().map(|h| h.table).collect();
        out.extend(
            self.chains
                .keys()
                .filter_map(|n| super::names::chain_table(n)),
        );
        out
    }

    /// The whole ruleset as `iptables-restore --noflush` transactions (one
    /// per table, in packet order) into empty tables: what a cold start
    /// writes; also the golden-test form.
    pub fn iptables_restore_text(&self) -> String {
        let mut out = String::new();
        for table in self.tables() {
            let _ = writeln!(out, "*{table}");
            for (name, _) in self.table_chains(table) {
                let _ = writeln!(out, ":{name} - [0:0]");
            }
            for (name, chain) in self.table_chains(table) {
                for rule in chain.rules.iter() {
                    let _ = writeln!(out, "-A {name} {}", rule.args());
                }
            }
            for hook in self.hooks.iter().filter(|h| h.table == table) {
                let _ = writeln!(out, "-I {} 1 {}", hook.builtin, hook.rule.args());
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// Every set as one `ipset restore` batch into a kernel that has none.
    pub fn ipset_restore_text(&self) -> String {
        let mut out = String::new();
        for (name, set) in &self.sets {
            let _ = writeln!(out, "create {name} {}", set.create_args());
            for m in set.members.iter() {
                let _ = writeln!(out, "add {name} {m}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_hash_chains_over_predecessors() {
        let mut a = Chain::default();
        a.push("C", "-j DROP", "");
        let mut b = Chain::default();
        b.push("C", "-j ACCEPT", "");
        b.push("C", "-j DROP", "");
        assert_ne!(
            a.rules[0].hash, b.rules[1].hash,
            "same rule, different position"
        );
        let mut c = Chain::default();
        c.push("D", "-j DROP", "");
        assert_ne!(
            a.rules[0].hash, c.rules[0].hash,
            "same rule, different chain"
        );
        assert_eq!(a.rules[0].hash.len(), 16);
    }

    #[test]
    fn notes_cannot_break_quoting() {
        let mut c = Chain::default();
        c.push("C", "-j DROP", "a\"b\\c$d");
        assert_eq!(c.rules[0].note, "a_b_c_d");
        assert!(
            c.rules[0]
                .args()
                .starts_with("-m comment --comment \"canal:")
        );
    }
}
