//! What the kernel holds, as far as policy enforcement is concerned: our
//! chains (as lists of rule hashes) in the raw, filter and security tables,
//! the hook rules that jump into them, and our ipsets. Built either by
//! parsing `iptables-save -t <table>` and `ipset save` (on start and on
//! drift checks) or from the ruleset that was just applied (every other
//! sync, so the hot path never reads the kernel).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::names::{self, COMMENT_PREFIX};
use super::ruleset::{Ruleset, SET_MAXELEM, Table};

/// A built-in chain of a table: where a hook lives.
pub type HookKey = (Table, String);

/// A rule in a built-in chain that jumps to one of our chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookState {
    /// 1-based position in the built-in chain.
    pub position: usize,
    /// The `canal:` hash of its comment, if it has one.
    pub hash: Option<String>,
    /// The rule as `iptables-save` printed it after `-A <chain> `, usable with `-D <chain>`.
    pub args: String,
}

/// One of our ipsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetState {
    /// Its type (`hash:net`, ...), as ipset names it.
    pub set_type: String,
    /// Its maxelem, when known.
    pub maxelem: Option<u32>,
    /// Members as `ipset save` prints them.
    pub members: Arc<BTreeSet<String>>,
}

/// The policy-owned part of the kernel's filter table and ipsets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Our chains: per rule, its `canal:` hash (None for a rule we did not write).
    pub chains: BTreeMap<String, Vec<Option<String>>>,
    /// Per built-in chain, the rules that jump into our chains.
    pub hooks: BTreeMap<HookKey, Vec<HookState>>,
    /// Our sets.
    pub sets: BTreeMap<String, SetState>,
}

impl KernelState {
    /// The state the kernel is in right after `ruleset` was applied.
    pub fn from_ruleset(ruleset: &Ruleset) -> KernelState {
        KernelState {
            chains: ruleset
                .chains
                .iter()
                .map(|(n, c)| {
                    (
                        n.clone(),
                        c.rules.iter().map(|r| Some(r.hash.clone())).collect(),
                    )
                })
                .collect(),
            hooks: ruleset
                .hooks
                .iter()
                .map(|h| {
                    (
                        (h.table, h.builtin.to_string()),
                        vec![HookState {
                            position: 1,
                            hash: Some(h.rule.hash.clone()),
                            args: h.rule.args(),
                        }],
                    )
                })
                .collect(),
            sets: ruleset
                .sets
                .iter()
                .map(|(n, s)| {
                    (
                        n.clone(),
                        SetState {
                            set_type: s.set_type.as_str().to_string(),
                            maxelem: Some(SET_MAXELEM),
                            members: s.members.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Parses `iptables-save -t <table>` listings (any number, one after
    /// the other, with or without `-c` counters) and `ipset save` output,
    /// keeping only what policy enforcement owns.
    pub fn parse(iptables_save: &str, ipset_save: &str) -> KernelState {
        let mut state = KernelState::default();
        let mut table: Option<Table> = None;
        let mut builtin_len: BTreeMap<(Table, &str), usize> = BTreeMap::new();
        for line in iptables_save.lines() {
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix('*') {
                table = Table::parse(name);
                continue;
            }
            let Some(table) = table else {
                continue;
            };
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if names::is_owned_chain_in(table, name) {
                    state.chains.entry(name.to_string()).or_default();
                }
                continue;
            }
            let Some((_, chain, args)) = split_rule(line) else {
                continue;
            };
            if names::is_owned_chain_in(table, chain) {
                state
                    .chains
                    .entry(chain.to_string())
                    .or_default()
                    .push(comment_hash(args));
            } else if let Some(builtin) = table.builtins().iter().find(|b| **b == chain) {
                let pos = builtin_len.entry((table, builtin)).or_default();
                *pos += 1;
                if jump_target(args).is_some_and(|t| names::is_owned_chain_in(table, t)) {
                    state
                        .hooks
                        .entry((table, builtin.to_string()))
                        .or_default()
                        .push(HookState {
                            position: *pos,
                            hash: comment_hash(args),
                            args: args.to_string(),
                        });
                }
            }
        }
        for line in ipset_save.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("create") => {
                    let (Some(name), Some(set_type)) = (words.next(), words.next()) else {
                        continue;
                    };
                    if !names::is_owned_set(name) {
                        continue;
                    }
                    let opts: Vec<&str> = words.collect();
                    let maxelem = opts
                        .windows(2)
                        .find(|w| w[0] == "maxelem")
                        .and_then(|w| w[1].parse().ok());
                    state.sets.insert(
                        name.to_string(),
                        SetState {
                            set_type: set_type.to_string(),
                            maxelem,
                            members: Arc::new(BTreeSet::new()),
                        },
                    );
                }
                Some("add") => {
                    let Some(name) = words.next() else { continue };
                    if let Some(set) = state.sets.get_mut(name) {
                        let member: Vec<&str> = words.collect();
                        Arc::make_mut(&mut set.members).insert(member.join(" "));
                    }
                }
                _ => {}
            }
        }
        state
    }

    /// Number of rules in our chains plus hooks.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum::<usize>()
            + self.hooks.values().map(Vec::len).sum::<usize>()
    }
}

/// A rule line of `iptables-save` (`[packets:bytes] -A CHAIN ARGS` with
/// `-c`, `-A CHAIN ARGS` without): (packet count, chain, args).
fn split_rule(line: &str) -> Option<(Option<u64>, &str, &str)> {
    let (packets, rest) = match line.strip_prefix('[') {
        Some(counted) => {
            let (counters, rest) = counted.split_once("] ")?;
            let packets = counters.split(':').next().and_then(|p| p.parse().ok());
            (packets, rest)
        }
        None => (None, line),
    };
    let rest = rest.strip_prefix("-A ")?;
    let (chain, args) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((packets, chain, args))
}

/// Packet counters of our rules, by rule hash, from `iptables-save -c`
/// listings (rules without a `canal:` hash or counters are skipped).
pub fn rule_packet_counts(iptables_save: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut table = None;
    for line in iptables_save.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            table = Table::parse(name);
            continue;
        }
        let Some(table) = table else { continue };
        if let Some((Some(packets), chain, args)) = split_rule(line)
            && names::is_owned_chain_in(table, chain)
            && let Some(hash) = comment_hash(args)
        {
            out.insert(hash, packets);
        }
    }
    out
}

/// The target of `-j X` / `-g X` in a rule.
fn jump_target(args: &str) -> Option<&str> {
    let mut words = args.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// The 16-hex hash of a `--comment "canal:<hash> ..."`, if any.
fn comment_hash(args: &str) -> Option<String> {
    let at = args.find("--comment ")? + "--comment ".len();
    let value = args[at..].trim_start();
    let value = value.strip_prefix('"').unwrap_or(value);
    let hash = value.strip_prefix(COMMENT_PREFIX)?;
    let hash: String = hash.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (hash.len() == 16).then_some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:CANAL-FORWARD - [0:0]
:CANAL-FWD-ALLOW - [0:0]
:CANAL-PI-0123456789abcdef - [0:0]
:KUBE-FORWARD - [0:0]
-A FORWARD -j KUBE-FORWARD
-A FORWARD -m comment --comment "canal:00112233445566aa canal policy" -j CANAL-FORWARD
-A FORWARD -j CANAL-FWD-ALLOW
-A CANAL-FORWARD -p tcp -m comment --comment "canal:aaaaaaaaaaaaaaaa x/y ingress rule 0" -m multiport --dports 80,90:100 -j ACCEPT
-A CANAL-FORWARD -j DROP
-A CANAL-FWD-ALLOW -s 10.244.0.0/16 -j ACCEPT
COMMIT
"#;

    const IPSET: &str = "create canal-a hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1\n\
add canal-a 10.1.0.0/16 nomatch\n\
add canal-a 10.0.0.0/8\n\
create other hash:ip family inet hashsize 1024 maxelem 65536\n\
add other 1.2.3.4\n\
create canal-b hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x2\n\
add canal-b 10.0.0.1,tcp:80\n";

    #[test]
    fn parses_only_owned_objects() {
        let s = KernelState::parse(SAVE, IPSET);
        assert_eq!(
            s.chains.keys().collect::<Vec<_>>(),
            vec!["CANAL-FORWARD", "CANAL-PI-0123456789abcdef"]
        );
        assert_eq!(
            s.chains["CANAL-FORWARD"],
            vec![Some("aaaaaaaaaaaaaaaa".to_string()), None]
        );
        assert!(s.chains["CANAL-PI-0123456789abcdef"].is_empty());
        let hooks = &s.hooks[&(Table::Filter, "FORWARD".to_string())];
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].position, 2);
        assert_eq!(hooks[0].hash.as_deref(), Some("00112233445566aa"));
        assert_eq!(
            hooks[0].args,
            "-m comment --comment \"canal:00112233445566aa canal policy\" -j CANAL-FORWARD"
        );
        assert_eq!(
            s.sets.keys().collect::<Vec<_>>(),
            vec!["canal-a", "canal-b"]
        );
        assert_eq!(s.sets["canal-a"].set_type, "hash:net");
        assert_eq!(s.sets["canal-a"].maxelem, Some(1_048_576));
        assert!(s.sets["canal-a"].members.contains("10.1.0.0/16 nomatch"));
        assert_eq!(s.sets["canal-b"].maxelem, Some(65536));
        assert_eq!(s.rule_count(), 3);
    }

    #[test]
    fn parses_every_table_and_counters() {
        let save = "*raw\n:PREROUTING ACCEPT [0:0]\n:CANAL-PREROUTING - [0:0]\n:CANAL-FORWARD - [0:0]\n\
[5:300] -A PREROUTING -m comment --comment \"canal:00000000000000aa canal anti-spoofing\" -j CANAL-PREROUTING\n\
[7:420] -A CANAL-PREROUTING -m comment --comment \"canal:00000000000000bb spoofed\" -i cali+ -m rpfilter --invert -j DROP\n\
COMMIT\n*security\n:FORWARD ACCEPT [0:0]\n:CANAL-GUARD-FORWARD - [0:0]\n\
[0:0] -A FORWARD -j ACCEPT\n\
[0:0] -A FORWARD -m comment --comment \"canal:00000000000000cc guard\" -j CANAL-GUARD-FORWARD\nCOMMIT\n";
        let s = KernelState::parse(save, "");
        // A filter chain name in the raw table is not ours.
        assert_eq!(
            s.chains.keys().collect::<Vec<_>>(),
            vec!["CANAL-GUARD-FORWARD", "CANAL-PREROUTING"]
        );
        assert_eq!(s.chains["CANAL-PREROUTING"].len(), 1);
        let guard = &s.hooks[&(Table::Security, "FORWARD".to_string())];
        assert_eq!(guard[0].position, 2);
        assert!(
            s.hooks
                .contains_key(&(Table::Raw, "PREROUTING".to_string()))
        );
        let counts = rule_packet_counts(save);
        assert_eq!(counts.get("00000000000000bb"), Some(&7));
        assert_eq!(counts.len(), 1, "hooks are in built-in chains: {counts:?}");
    }

    #[test]
    fn comment_hash_variants() {
        assert_eq!(
            comment_hash("-m comment --comment canal:0123456789abcdef -j X").as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(
            comment_hash("-m comment --comment \"cali:0123456789abcdef\""),
            None
        );
        assert_eq!(comment_hash("-m comment --comment \"canal:0123\""), None);
        assert_eq!(comment_hash("-j ACCEPT"), None);
    }
}
