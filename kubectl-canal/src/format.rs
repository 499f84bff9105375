//! Text of explanations and status tables (pure).

use canal_crds::PeerSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::explain::{DirectionReport, End, Enforcement, Explanation, Verdict};
use crate::status::NodeStatus;

/// The explanation as printed: the verdict on the first line, then each direction.
pub fn explanation(e: &Explanation) -> String {
    let mut out = String::new();
    out.push_str(if e.allowed { "allowed\n" } else { "denied\n" });
    let port = match &e.port_name {
        Some(n) => format!("{} {} (port {n})", proto(e.protocol), e.port),
        None => format!("{} {}", proto(e.protocol), e.port),
    };
    out.push_str(&format!("{} -> {} {port}\n", end(&e.from), end(&e.to)));
    for d in [&e.egress, &e.ingress] {
        direction(&mut out, d);
    }
    out
}

fn proto(p: canal_crds::Protocol) -> String {
    p.as_lower().to_ascii_uppercase()
}

fn end(e: &End) -> String {
    match (&e.pod, &e.node) {
        (Some(p), Some(n)) => format!("{p} ({}, {n})", e.ip),
        (Some(p), None) => format!("{p} ({})", e.ip),
        (None, Some(n)) => format!("{} (node {n})", e.ip),
        (None, None) => e.ip.to_string(),
    }
}

fn direction(out: &mut String, d: &DirectionReport) {
    let dir = d.direction.as_str();
    let whose = match (&d.pod, &d.enforcement) {
        (Some(p), Some(en)) => format!("{dir} of {p} on {}", en.node),
        (Some(p), None) => format!("{dir} of {p}"),
        (None, Some(en)) => format!("{dir} on {}", en.node),
        (None, None) => dir.to_string(),
    };
    let verdict = if d.allowed { "allowed" } else { "denied" };
    match &d.verdict {
        Verdict::SamePod => out.push_str(&format!(
            "{whose}: {verdict}: a pod's connection to itself never leaves the pod\n"
        )),
        Verdict::NotPoliced(why) => out.push_str(&format!("{whose}: {verdict}: not policed: {why}\n")),
        Verdict::NotIsolated => out.push_str(&format!(
            "{whose}: {verdict}: not isolated (no NetworkPolicy selects {} for {dir})\n",
            d.pod.as_deref().unwrap_or("it")
        )),
        Verdict::Allowed {
            isolated_by,
            policy,
            rule,
            peer,
            port,
        } => {
            out.push_str(&format!(
                "{whose}: {verdict} by {policy} {dir} rule {rule} (isolated by {})\n",
                isolated_by.join(", ")
            ));
            out.push_str(&format!("  peer: {peer}\n  port: {port}\n"));
        }
        Verdict::Denied {
            isolated_by,
            misses,
        } => {
            let list = if isolated_by.is_empty() {
                "policies the NodePolicySet does not contain".to_string()
            } else {
                isolated_by.join(", ")
            };
            out.push_str(&format!(
                "{whose}: {verdict}: isolated by {list}; no rule matches\n"
            ));
            for m in misses {
                match m.rule {
                    None => out.push_str(&format!(
                        "  {}: no {dir} rules (allows nothing)\n",
                        m.policy
                    )),
                    Some(i) => out.push_str(&format!(
                        "  {} {dir} rule {i}: peer {}, port {}\n",
                        m.policy,
                        if m.peer { "matches" } else { "does not match" },
                        if m.port { "matches" } else { "does not match" },
                    )),
                }
            }
        }
        Verdict::UnknownEndpoint(iface) => out.push_str(&format!(
            "{whose}: {verdict}: the node's NodePolicySet does not list {} yet (interface {iface}): its traffic is dropped\n",
            d.pod.as_deref().unwrap_or("the pod")
        )),
        Verdict::Spoofed => out.push_str(&format!(
            "{whose}: {verdict}: the source address is not the pod's (anti-spoofing)\n"
        )),
        Verdict::HostDrop => out.push_str(&format!(
            "{whose}: {verdict}: defaultEndpointToHostAction is Drop\n"
        )),
    }
    for w in &d.warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    if let Some(en) = &d.enforcement {
        out.push_str(&format!("  {}\n", enforcement(en)));
    }
}

/// Whether the node reports the generation this answer used.
pub fn enforcement(e: &Enforcement) -> String {
    let dp = e
        .dataplane
        .as_deref()
        .map(|d| format!(", {d}"))
        .unwrap_or_default();
    let gen_ = e.generation.map_or("?".to_string(), |g| g.to_string());
    if e.current() {
        format!("{}: NodePolicySet generation {gen_} enforced{dp}", e.node)
    } else {
        let programmed = e
            .observed
            .map_or("nothing".to_string(), |g| format!("generation {g}"));
        let cond = match e.enforced {
            Some(true) => "Enforced True".to_string(),
            Some(false) => format!("Enforced False ({})", e.message),
            None => "no Enforced condition".to_string(),
        };
        format!(
            "{}: NOT enforced yet: this answer uses generation {gen_}, the agent reports {programmed} programmed, {cond}{dp}",
            e.node
        )
    }
}

/// A PeerSet's selector in short form.
pub fn selector(s: &PeerSelector) -> String {
    let mut parts = Vec::new();
    match (&s.namespace, &s.namespace_selector) {
        (Some(ns), _) => parts.push(format!("namespace {ns}")),
        (None, Some(sel)) => parts.push(format!("namespaces {}", labels(sel))),
        (None, None) => parts.push("all namespaces".into()),
    }
    match &s.pod_selector {
        Some(sel) => parts.push(format!("pods {}", labels(sel))),
        None => parts.push("all pods".into()),
    }
    if let Some(np) = &s.named_port {
        parts.push(format!("port {}/{}", np.name, proto(np.protocol)));
    }
    parts.join(", ")
}

fn labels(sel: &LabelSelector) -> String {
    let mut out: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        out.push(match e.operator.as_str() {
            "Exists" | "DoesNotExist" => format!("{} {}", e.key, e.operator),
            op => format!("{} {op} ({values})", e.key),
        });
    }
    if out.is_empty() {
        "(any)".into()
    } else {
        out.join(",")
    }
}

/// The status table, columns aligned.
pub fn status_table(rows: &[NodeStatus], summary: &[String]) -> String {
    let header = [
        "NODE",
        "GENERATION",
        "PROGRAMMED",
        "ENFORCED",
        "DATAPLANE",
        "ENDPOINTS",
        "RULES",
        "SETS",
        "PEERS",
        "NETWORK",
        "LAST ERROR",
    ];
    let opt = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.node.clone(),
                opt(r.generation),
                opt(r.programmed),
                r.enforced.clone(),
                r.dataplane.clone().unwrap_or_else(|| "-".into()),
                opt(r.endpoints.map(i64::from)),
                opt(r.rules.map(i64::from)),
                opt(r.sets.map(i64::from)),
                r.overlay_peers.to_string(),
                r.network.clone(),
                r.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &table {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &table {
        line(row.iter().map(String::as_str).collect());
    }
    for s in summary {
        out.push_str(s);
        out.push('\n');
    }
    out
}
