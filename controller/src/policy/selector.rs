//! Label sets and label selectors in canonical form, with Kubernetes'
//! matching rules (`k8s.io/apimachinery/pkg/labels`).
//!
//! `matchLabels: {k: v}` and `matchExpressions: [{key: k, operator: In,
//! values: [v]}]` mean the same thing and become the same requirement, so
//! policies that spell one selector differently still share its results.

use std::collections::BTreeMap;
use std::fmt::Write;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::intern::{Interner, Sym};

/// A pod's or namespace's labels, interned, sorted by key text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Sym, Sym)]>);

impl Labels {
    /// Interns a label map.
    pub fn new(interner: &mut Interner, labels: &BTreeMap<String, String>) -> Labels {
        // BTreeMap iterates in key order, so the result is sorted.
        Labels(
            labels
                .iter()
                .map(|(k, v)| (interner.intern(k), interner.intern(v)))
                .collect(),
        )
    }

    /// The value of `key`, if the label is set.
    pub fn get(&self, key: &Sym) -> Option<&Sym> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The labels as (key, value) pairs.
    pub fn iter(&self) -> impl Iterator<Item = &(Sym, Sym)> {
        self.0.iter()
    }
}

/// A selector operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// The label is set to one of the values.
    In,
    /// The label is not set, or set to none of the values.
    NotIn,
    /// The label is set.
    Exists,
    /// The label is not set.
    DoesNotExist,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::In => "In",
            Op::NotIn => "NotIn",
            Op::Exists => "Exists",
            Op::DoesNotExist => "DoesNotExist",
        }
    }
}

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    key: Sym,
    op: Op,
    /// Sorted by text, without duplicates; empty for Exists/DoesNotExist.
    values: Box<[Sym]>,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match (self.op, labels.get(&self.key)) {
            (Op::In, Some(v)) => self.values.contains(v),
            (Op::In, None) => false,
            (Op::NotIn, Some(v)) => !self.values.contains(v),
            (Op::NotIn, None) => true,
            (Op::Exists, found) => found.is_some(),
            (Op::DoesNotExist, found) => found.is_none(),
        }
    }

    fn sort_key(&self) -> (&str, Op, Vec<&str>) {
        (
            self.key.as_str(),
            self.op,
            self.values.iter().map(|v| v.as_str()).collect(),
        )
    }
}

/// A label selector in canonical form: requirements sorted and deduplicated.
/// The empty selector matches everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    reqs: Box<[Requirement]>,
}

/// Why a selector cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The operator is not In, NotIn, Exists or DoesNotExist.
    #[error(
        "matchExpressions key {key:?}: operator {operator:?} is not In, NotIn, Exists or DoesNotExist"
    )]
    UnknownOperator { key: String, operator: String },
    /// In/NotIn without values.
    #[error("matchExpressions key {key:?}: operator {operator} needs at least one value")]
    MissingValues { key: String, operator: &'static str },
    /// Exists/DoesNotExist with values.
    #[error("matchExpressions key {key:?}: operator {operator} takes no values")]
    UnexpectedValues { key: String, operator: &'static str },
}

impl Selector {
    /// The selector that matches everything.
    pub fn everything() -> Selector {
        Selector { reqs: Box::new([]) }
    }

    /// Converts a Kubernetes label selector, interning its strings.
    pub fn parse(interner: &mut Interner, sel: &LabelSelector) -> Result<Selector, SelectorError> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(Requirement {
                key: interner.intern(k),
                op: Op::In,
                values: Box::new([interner.intern(v)]),
            });
        }
        for expr in sel.match_expressions.iter().flatten() {
            reqs.push(parse_requirement(interner, expr)?);
        }
        reqs.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        reqs.dedup();
        Ok(Selector {
            reqs: reqs.into_boxed_slice(),
        })
    }

    /// True when `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.reqs.iter().all(|r| r.matches(labels))
    }

    /// True for the selector that matches everything.
    pub fn is_everything(&self) -> bool {
        self.reqs.is_empty()
    }

    /// A canonical, unambiguous text of the selector (strings JSON-quoted),
    /// stable across releases because object names are derived from it.
    pub fn canonical_text(&self) -> String {
        let mut out = String::from("{");
        for (i, r) in self.reqs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&quote(&r.key));
            out.push(' ');
            out.push_str(r.op.as_str());
            if !r.values.is_empty() {
                out.push_str(" (");
                for (j, v) in r.values.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    out.push_str(&quote(v));
                }
                out.push(')');
            }
        }
        out.push('}');
        out
    }

    /// The selector as a Kubernetes `LabelSelector`, every requirement a
    /// `matchExpressions` entry, in canonical order.
    pub fn to_label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: if self.reqs.is_empty() {
                None
            } else {
                Some(
                    self.reqs
                        .iter()
                        .map(|r| LabelSelectorRequirement {
                            key: r.key.to_string(),
                            operator: r.op.as_str().to_string(),
                            values: if r.values.is_empty() {
                                None
                            } else {
                                Some(r.values.iter().map(|v| v.to_string()).collect())
                            },
                        })
                        .collect(),
                )
            },
        }
    }
}

fn parse_requirement(
    interner: &mut Interner,
    expr: &LabelSelectorRequirement,
) -> Result<Requirement, SelectorError> {
    let op = match expr.operator.as_str() {
        "In" => Op::In,
        "NotIn" => Op::NotIn,
        "Exists" => Op::Exists,
        "DoesNotExist" => Op::DoesNotExist,
        other => {
            return Err(SelectorError::UnknownOperator {
                key: expr.key.clone(),
                operator: other.to_string(),
            });
        }
    };
    let values = expr.values.as_deref().unwrap_or_default();
    match op {
        Op::In | Op::NotIn if values.is_empty() => {
            return Err(SelectorError::MissingValues {
                key: expr.key.clone(),
                operator: op.as_str(),
            });
        }
        Op::Exists | Op::DoesNotExist if !values.is_empty() => {
            return Err(SelectorError::UnexpectedValues {
                key: expr.key.clone(),
                operator: op.as_str(),
            });
        }
        _ => {}
    }
    let mut values: Vec<Sym> = values.iter().map(|v| interner.intern(v)).collect();
    values.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    values.dedup();
    Ok(Requirement {
        key: interner.intern(&expr.key),
        op,
        values: values.into_boxed_slice(),
    })
}

fn quote(s: &str) -> String {
    // JSON string syntax: stable, and no label text can break out of it.
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(i: &mut Interner, pairs: &[(&str, &str)]) -> Labels {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Labels::new(i, &map)
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn sel(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: if match_labels.is_empty() {
                None
            } else {
                Some(
                    match_labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            },
            match_expressions: if exprs.is_empty() { None } else { Some(exprs) },
        }
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let mut i = Interner::default();
        let web = labels(&mut i, &[("app", "web"), ("tier", "front")]);
        let db = labels(&mut i, &[("app", "db")]);
        let none = labels(&mut i, &[]);
        // (selector, matches web, matches db, matches no labels)
        let table: Vec<(LabelSelector, bool, bool, bool)> = vec![
            (sel(&[], vec![]), true, true, true),
            (sel(&[("app", "web")], vec![]), true, false, false),
            (
                sel(&[], vec![expr("app", "In", &["web", "x"])]),
                true,
                false,
                false,
            ),
            (
                sel(&[], vec![expr("app", "NotIn", &["web"])]),
                false,
                true,
                true,
            ),
            (
                sel(&[], vec![expr("tier", "Exists", &[])]),
                true,
                false,
                false,
            ),
            (
                sel(&[], vec![expr("tier", "DoesNotExist", &[])]),
                false,
                true,
                true,
            ),
            (
                sel(&[("app", "web")], vec![expr("tier", "In", &["back"])]),
                false,
                false,
                false,
            ),
            (sel(&[("missing", "x")], vec![]), false, false, false),
        ];
        for (n, (s, w, d, e)) in table.into_iter().enumerate() {
            let parsed = Selector::parse(&mut i, &s).unwrap();
            assert_eq!(
                (
                    parsed.matches(&web),
                    parsed.matches(&db),
                    parsed.matches(&none)
                ),
                (w, d, e),
                "row {n}: {s:?}"
            );
        }
    }

    #[test]
    fn equivalent_spellings_share_one_canonical_form() {
        let mut i = Interner::default();
        let a = Selector::parse(&mut i, &sel(&[("app", "web"), ("tier", "x")], vec![])).unwrap();
        let b = Selector::parse(
            &mut i,
            &sel(
                &[],
                vec![
                    expr("tier", "In", &["x"]),
                    expr("app", "In", &["web"]),
                    expr("app", "In", &["web"]),
                ],
            ),
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.canonical_text(), b.canonical_text());
        assert_eq!(a.canonical_text(), r#"{"app" In ("web"),"tier" In ("x")}"#);
        let c =
            Selector::parse(&mut i, &sel(&[], vec![expr("a", "In", &["y", "x", "y"])])).unwrap();
        assert_eq!(c.canonical_text(), r#"{"a" In ("x","y")}"#);
        assert_eq!(Selector::everything().canonical_text(), "{}");
    }

    #[test]
    fn canonical_text_cannot_be_confused_by_separators_in_values() {
        let mut i = Interner::default();
        let one = Selector::parse(&mut i, &sel(&[], vec![expr("a", "In", &["x\",\"y"])])).unwrap();
        let two = Selector::parse(&mut i, &sel(&[], vec![expr("a", "In", &["x", "y"])])).unwrap();
        assert_ne!(one.canonical_text(), two.canonical_text());
    }

    #[test]
    fn malformed_requirements_are_errors() {
        let mut i = Interner::default();
        assert!(matches!(
            Selector::parse(&mut i, &sel(&[], vec![expr("a", "Foo", &["x"])])),
            Err(SelectorError::UnknownOperator { .. })
        ));
        assert!(matches!(
            Selector::parse(&mut i, &sel(&[], vec![expr("a", "In", &[])])),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            Selector::parse(&mut i, &sel(&[], vec![expr("a", "Exists", &["x"])])),
            Err(SelectorError::UnexpectedValues { .. })
        ));
    }

    #[test]
    fn round_trips_through_label_selector() {
        let mut i = Interner::default();
        let s = Selector::parse(
            &mut i,
            &sel(&[("app", "web")], vec![expr("tier", "DoesNotExist", &[])]),
        )
        .unwrap();
        let back = Selector::parse(&mut i, &s.to_label_selector()).unwrap();
        assert_eq!(s, back);
    }
}
