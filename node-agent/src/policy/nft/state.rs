//! What the kernel holds of one of canal's nftables tables: chains (as
//! lists of rule hashes, read from the `canal:<hash>` comments), base-chain
//! hooks, and sets with their elements spelled as the renderer spells
//! them. Built either from `nft -j list table inet <table>` (start, drift
//! checks, after a failure) or from the ruleset just applied (every other
//! sync, so the hot path never reads the kernel).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use crate::policy::names::COMMENT_PREFIX;
use crate::policy::ruleset::Rule;

use super::ruleset::{BaseChain, NftRuleset};

/// One chain in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainState {
    /// Its hook, for a base chain.
    pub base: Option<BaseChain>,
    /// Per rule, its `canal:` hash (None: a rule canal did not write).
    pub rules: RuleHashes,
}

/// A chain's rule hashes: as read from the kernel, or the rules canal just
/// applied, shared with the ruleset (keeping the state of 20,000 rules
/// after every sync costs no copy, and comparing a chain that did not
/// change is a pointer comparison).
#[derive(Clone, Debug)]
pub enum RuleHashes {
    /// Read from a listing.
    Read(Vec<Option<String>>),
    /// Exactly these rules were applied.
    Applied(Arc<Vec<Rule>>),
}

impl Default for RuleHashes {
    fn default() -> Self {
        RuleHashes::Read(Vec::new())
    }
}

impl From<Vec<Option<String>>> for RuleHashes {
    fn from(v: Vec<Option<String>>) -> Self {
        RuleHashes::Read(v)
    }
}

impl RuleHashes {
    /// Number of rules.
    pub fn len(&self) -> usize {
        match self {
            RuleHashes::Read(v) => v.len(),
            RuleHashes::Applied(r) => r.len(),
        }
    }

    /// No rules.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hashes in order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = Option<&str>> + '_> {
        match self {
            RuleHashes::Read(v) => Box::new(v.iter().map(Option::as_deref)),
            RuleHashes::Applied(r) => Box::new(r.iter().map(|r| Some(r.hash.as_str()))),
        }
    }

    /// Whether these are exactly `rules` (same hashes in the same order).
    pub fn matches(&self, rules: &Arc<Vec<Rule>>) -> bool {
        match self {
            RuleHashes::Applied(a) if Arc::ptr_eq(a, rules) => true,
            _ => {
                self.len() == rules.len()
                    && self
                        .iter()
                        .zip(rules.iter())
                        .all(|(h, r)| h == Some(r.hash.as_str()))
            }
        }
    }

    /// The hashes as a list to change (copied once from applied rules).
    pub fn to_mut(&mut self) -> &mut Vec<Option<String>> {
        if let RuleHashes::Applied(r) = self {
            *self = RuleHashes::Read(r.iter().map(|r| Some(r.hash.clone())).collect());
        }
        match self {
            RuleHashes::Read(v) => v,
            // Just replaced by Read above.
            RuleHashes::Applied(_) => unreachable!("converted to Read"),
        }
    }
}

impl PartialEq for RuleHashes {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (RuleHashes::Applied(a), RuleHashes::Applied(b)) if Arc::ptr_eq(a, b) => true,
            (_, RuleHashes::Applied(b)) => self.matches(b),
            _ => self.len() == other.len() && self.iter().eq(other.iter()),
        }
    }
}

impl Eq for RuleHashes {}

impl PartialEq<Vec<Option<String>>> for RuleHashes {
    fn eq(&self, other: &Vec<Option<String>>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter().map(Option::as_deref))
    }
}

/// One set or map in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetState {
    /// Key type (`ipv4_addr`, `ifname . ipv4_addr`).
    pub key_type: String,
    /// `Some("verdict")` for a verdict map.
    pub data: Option<&'static str>,
    /// The interval flag.
    pub interval: bool,
    /// Elements, spelled as [`super::ruleset::NftSet::elements`].
    pub elements: Arc<BTreeSet<String>>,
}

/// A table as far as canal is concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftState {
    /// The table's name.
    pub table: String,
    /// Whether the table exists.
    pub exists: bool,
    /// Its chains.
    pub chains: BTreeMap<String, ChainState>,
    /// Its sets and maps.
    pub sets: BTreeMap<String, SetState>,
}

/// A listing that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable nft JSON listing: {0}")]
pub struct ParseError(String);

impl NftState {
    /// A table that does not exist.
    pub fn absent(table: &str) -> NftState {
        NftState {
            table: table.to_string(),
            ..NftState::default()
        }
    }

    /// The state right after `r` was applied.
    pub fn from_ruleset(r: &NftRuleset) -> NftState {
        NftState {
            table: r.table.clone(),
            exists: true,
            chains: r
                .chains
                .iter()
                .map(|(n, c)| {
                    (
                        n.clone(),
                        ChainState {
                            base: c.base.clone(),
                            rules: RuleHashes::Applied(c.rules.clone()),
                        },
                    )
                })
                .collect(),
            sets: r
                .sets
                .iter()
                .map(|(n, s)| {
                    (
                        n.clone(),
                        SetState {
                            key_type: s.key_type.clone(),
                            data: s.data,
                            interval: s.interval,
                            elements: s.elements.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Parses `nft -j list table inet <table>` (or `list ruleset`: other
    /// tables are skipped). Empty output or no such table: absent.
    pub fn parse(table: &str, json: &str) -> Result<NftState, ParseError> {
        let mut state = NftState::absent(table);
        if json.trim().is_empty() {
            return Ok(state);
        }
        let doc: Value = serde_json::from_str(json).map_err(|e| ParseError(e.to_string()))?;
        let items = doc
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| ParseError("no nftables array".into()))?;
        let ours = |o: &Value, key: &str| {
            o.get("family").and_then(Value::as_str) == Some(super::ruleset::FAMILY)
                && o.get(key).and_then(Value::as_str) == Some(table)
        };
        for item in items {
            if let Some(t) = item.get("table") {
                if ours(t, "name") {
                    state.exists = true;
                }
            } else if let Some(c) = item.get("chain") {
                if !ours(c, "table") {
                    continue;
                }
                let name = str_of(c, "name")?;
                let base = match c.get("hook").and_then(Value::as_str) {
                    Some(hook) => Some(BaseChain {
                        kind: known(str_of(c, "type")?, &["filter", "nat", "route"]),
                        hook: known(
                            hook,
                            &["prerouting", "input", "forward", "output", "postrouting"],
                        ),
                        priority: c.get("prio").and_then(Value::as_i64).unwrap_or_default() as i32,
                    }),
                    None => None,
                };
                state.chains.entry(name.to_string()).or_default().base = base;
            } else if let Some(r) = item.get("rule") {
                if !ours(r, "table") {
                    continue;
                }
                let chain = str_of(r, "chain")?;
                let hash = r
                    .get("comment")
                    .and_then(Value::as_str)
                    .and_then(comment_hash);
                state
                    .chains
                    .entry(chain.to_string())
                    .or_default()
                    .rules
                    .to_mut()
                    .push(hash);
            } else if let Some((s, is_map)) = item
                .get("set")
                .map(|s| (s, false))
                .or_else(|| item.get("map").map(|m| (m, true)))
            {
                if !ours(s, "table") {
                    continue;
                }
                let name = str_of(s, "name")?;
                let types: Vec<String> = match s.get("type") {
                    Some(Value::String(t)) => vec![t.clone()],
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect(),
                    _ => return Err(ParseError(format!("set {name} has no type"))),
                };
                let interval = s
                    .get("flags")
                    .and_then(Value::as_array)
                    .is_some_and(|f| f.iter().any(|f| f.as_str() == Some("interval")));
                let data = if is_map {
                    Some(known(
                        s.get("map").and_then(Value::as_str).unwrap_or(""),
                        &["verdict"],
                    ))
                } else {
                    None
                };
                let mut elements = BTreeSet::new();
                for e in s
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    elements.insert(element(e, &types, is_map));
                }
                state.sets.insert(
                    name.to_string(),
                    SetState {
                        key_type: types.join(" . "),
                        data,
                        interval,
                        elements: Arc::new(elements),
                    },
                );
            }
        }
        Ok(state)
    }

    /// Number of rules in the table.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }
}

fn str_of<'a>(o: &'a Value, key: &str) -> Result<&'a str, ParseError> {
    o.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ParseError(format!("an object without {key}")))
}

/// `s` as one of the static spellings canal uses (else "?", which never
/// equals what canal renders, so the object is rewritten).
fn known(s: &str, options: &[&'static str]) -> &'static str {
    options.iter().find(|o| **o == s).copied().unwrap_or("?")
}

/// The 16-hex hash of a `canal:<hash> ...` comment.
fn comment_hash(c: &str) -> Option<String> {
    let hash = c.strip_prefix(COMMENT_PREFIX)?;
    let hash: String = hash.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (hash.len() == 16).then_some(hash)
}

/// One element as the renderer spells it.
fn element(e: &Value, types: &[String], is_map: bool) -> String {
    if is_map && let Some([key, data]) = e.as_array().map(Vec::as_slice) {
        return format!("{} : {}", value(key, types, 0), verdict(data));
    }
    value(e, types, 0)
}

fn value(v: &Value, types: &[String], at: usize) -> String {
    match v {
        Value::String(s) => {
            if types.get(at).map(String::as_str) == Some("ifname") {
                format!("\"{s}\"")
            } else {
                s.clone()
            }
        }
        Value::Number(n) => n.to_string(),
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let addr = p.get("addr").and_then(Value::as_str).unwrap_or("?");
                let len = p.get("len").and_then(Value::as_u64).unwrap_or(0);
                format!("{addr}/{len}")
            } else if let Some(Value::Array(r)) = o.get("range") {
                let part = |i: usize| r.get(i).map(|x| value(x, types, at)).unwrap_or_default();
                format!("{}-{}", part(0), part(1))
            } else if let Some(Value::Array(parts)) = o.get("concat") {
                parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| value(p, types, at + i))
                    .collect::<Vec<_>>()
                    .join(" . ")
            } else if let Some(e) = o.get("elem") {
                value(e.get("val").unwrap_or(&Value::Null), types, at)
            } else {
                v.to_string()
            }
        }
        other => other.to_string(),
    }
}

fn verdict(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => {
            for kind in ["jump", "goto"] {
                if let Some(t) = o
                    .get(kind)
                    .and_then(|j| j.get("target"))
                    .and_then(Value::as_str)
                {
                    return format!("{kind} {t}");
                }
            }
            o.keys().next().cloned().unwrap_or_default()
        }
        other => other.to_string(),
    }
}

/// Packet counters of canal's rules in a JSON listing, by rule hash (rules
/// without a `canal:` comment or a counter are skipped).
pub fn rule_packet_counts(json: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(doc) = serde_json::from_str::<Value>(json) else {
        return out;
    };
    for item in doc
        .get("nftables")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let Some(hash) = rule
            .get("comment")
            .and_then(Value::as_str)
            .and_then(comment_hash)
        else {
            continue;
        };
        let packets = rule
            .get("expr")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|e| e.get("counter")?.get("packets")?.as_u64());
        if let Some(p) = packets {
            out.insert(hash, p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
{"table": {"family": "inet", "name": "canal", "handle": 5}},
{"table": {"family": "ip", "name": "filter", "handle": 1}},
{"set": {"family": "inet", "name": "blk4-a", "table": "canal", "type": "ipv4_addr", "handle": 2, "flags": ["interval"],
  "elem": [{"prefix": {"addr": "10.0.0.0", "len": 25}}, "10.1.0.1", {"range": ["10.3.0.1", "10.3.0.9"]}]}},
{"set": {"family": "inet", "name": "spoof-v4", "table": "canal", "type": ["ifname", "ipv4_addr"], "handle": 3,
  "elem": [{"concat": ["cali1", "10.0.0.1"]}]}},
{"set": {"family": "inet", "name": "pp4-b", "table": "canal", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 4,
  "elem": [{"concat": ["10.0.0.1", "tcp", 80]}, {"elem": {"val": {"concat": ["10.0.0.2", "udp", 53]}, "counter": {"packets": 1}}}]}},
{"map": {"family": "inet", "name": "to-wl", "table": "canal", "type": "ifname", "handle": 6, "map": "verdict",
  "elem": [["cali1", {"jump": {"target": "tw-cali1"}}]]}},
{"chain": {"family": "inet", "table": "canal", "name": "forward", "handle": 7, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
{"chain": {"family": "inet", "table": "canal", "name": "tw-cali1", "handle": 8}},
{"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
{"rule": {"family": "inet", "table": "canal", "chain": "tw-cali1", "handle": 9, "comment": "canal:0123456789abcdef ok",
  "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"drop": null}]}},
{"rule": {"family": "inet", "table": "canal", "chain": "tw-cali1", "handle": 10, "expr": [{"accept": null}]}},
{"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 2, "comment": "canal:fedcba9876543210", "expr": []}}
]}"#;

    #[test]
    fn reads_only_canals_table_spelled_as_rendered() {
        let s = NftState::parse("canal", LISTING).unwrap();
        assert!(s.exists);
        assert_eq!(
            s.chains.keys().collect::<Vec<_>>(),
            vec!["forward", "tw-cali1"]
        );
        assert_eq!(
            s.chains["forward"].base,
            Some(BaseChain {
                kind: "filter",
                hook: "forward",
                priority: 0
            })
        );
        assert_eq!(
            s.chains["tw-cali1"].rules,
            vec![Some("0123456789abcdef".to_string()), None]
        );
        let els = |n: &str| s.sets[n].elements.iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            els("blk4-a"),
            vec!["10.0.0.0/25", "10.1.0.1", "10.3.0.1-10.3.0.9"]
        );
        assert!(s.sets["blk4-a"].interval);
        assert_eq!(els("spoof-v4"), vec!["\"cali1\" . 10.0.0.1"]);
        assert_eq!(s.sets["spoof-v4"].key_type, "ifname . ipv4_addr");
        assert_eq!(
            els("pp4-b"),
            vec!["10.0.0.1 . tcp . 80", "10.0.0.2 . udp . 53"]
        );
        assert_eq!(els("to-wl"), vec!["\"cali1\" : jump tw-cali1"]);
        assert_eq!(s.sets["to-wl"].data, Some("verdict"));
        let counts = rule_packet_counts(LISTING);
        assert_eq!(counts.get("0123456789abcdef"), Some(&7));
        assert_eq!(counts.len(), 1);
    }

    #[test]
    fn no_table_is_absent() {
        let s = NftState::parse("canal", r#"{"nftables": [{"metainfo": {}}]}"#).unwrap();
        assert!(!s.exists && s.chains.is_empty());
        assert!(!NftState::parse("canal", "").unwrap().exists);
        assert!(NftState::parse("canal", "{").is_err());
    }
}
