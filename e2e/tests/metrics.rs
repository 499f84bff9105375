//! Prometheus: every metric the binaries serve is documented in the README
//! (name and type), every documented metric is served, and every metric the
//! Grafana dashboard queries exists. The served side is scraped from the
//! real canal-controller and canal-agents of a lab with a pod and a
//! NetworkPolicy, so the values are checked too, not only the names.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use canal_e2e::Lab;
use canal_e2e::lab::{PodOptions, UpOptions};
use serde_json::Value;
use support::eventually;
use support::policy::apply_policies;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Metric families: name -> type.
type Families = BTreeMap<String, String>;

/// Standard metrics both binaries serve next to canal's own (the process
/// collector); the README lists them by reference, not in a table.
fn standard(name: &str) -> bool {
    name.starts_with("process_")
}

/// The metrics the README's tables document: every row whose first cell
/// holds backticked `canal_` names (several per row are allowed), with the
/// type from the second cell. A name documented twice is an error.
fn documented() -> Families {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut out = Families::new();
    let mut twice = Vec::new();
    // Rows of the metric tables only (header `| metric | type |` or
    // `| name | type |`), not of the flag or benchmark tables.
    let mut in_table = false;
    let mut rows = Vec::new();
    for line in readme.lines() {
        if !line.starts_with('|') {
            in_table = false;
        } else if line.starts_with("| metric | type |") || line.starts_with("| name | type |") {
            in_table = true;
        } else if in_table && line.starts_with("| `") {
            rows.push(line);
        }
    }
    for line in rows {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (names, kind) = (cells[1], cells[2]);
        for name in names.split('`').skip(1).step_by(2) {
            if !name.starts_with("canal_") {
                continue;
            }
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "README documents {name} with type {kind:?}"
            );
            if out.insert(name.to_string(), kind.to_string()).is_some() {
                twice.push(name.to_string());
            }
        }
    }
    assert!(
        twice.is_empty(),
        "metrics documented more than once: {twice:?}"
    );
    assert!(out.len() > 50, "README tables parsed: {out:?}");
    out
}

/// Metric names in a PromQL expression (histogram series folded into their
/// family name).
fn queried(expr: &str, histograms: &BTreeSet<String>) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("canal_") || t.starts_with("process_"))
        .map(|t| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    t.strip_suffix(s)
                        .filter(|base| histograms.contains(*base))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| t.to_string())
        })
        .collect()
}

fn dashboard() -> Value {
    let path = repo().join("charts/canal/dashboards/canal.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every PromQL expression of the dashboard: panel targets and variables.
fn dashboard_queries(dash: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

fn dashboard_metrics(histograms: &BTreeSet<String>) -> BTreeSet<String> {
    dashboard_queries(&dashboard())
        .iter()
        .flat_map(|e| queried(e, histograms))
        .collect()
}

fn histograms(f: &Families) -> BTreeSet<String> {
    f.iter()
        .filter(|(_, t)| *t == "histogram")
        .map(|(n, _)| n.clone())
        .collect()
}

#[test]
fn the_dashboard_is_well_formed_and_queries_only_documented_metrics() {
    let dash = dashboard();
    let docs = documented();
    let used = dashboard_metrics(&histograms(&docs));

    let undocumented: Vec<&String> = used
        .iter()
        .filter(|m| !standard(m) && !docs.contains_key(*m))
        .collect();
    assert!(
        undocumented.is_empty(),
        "the dashboard queries metrics the README does not document: {undocumented:?}"
    );

    // Panels: unique ids, a datasource, and per panel unique refIds.
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {:?} uses the datasource variable",
            p["title"]
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {:?} has no query", p["title"]);
        let refs: BTreeSet<&str> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "refIds of {:?}", p["title"]);
    }
    // Histograms are queried through their buckets (quantiles), never as a
    // bare name, which would match nothing.
    for e in dashboard_queries(&dash) {
        for h in histograms(&docs) {
            let bare = e
                .match_indices(h.as_str())
                .any(|(i, _)| !e[i + h.len()..].starts_with('_'));
            assert!(!bare, "{h} queried without _bucket/_sum/_count in {e}");
        }
    }
}

/// Families (`# TYPE` lines) of a Prometheus text exposition.
fn families(text: &str) -> Families {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_string(), t.trim().to_string()))
        .collect()
}

/// The value of one series, given exactly as exposed (`name{a="b"}`).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Checks that `text` has each series at its value, and
/// `canal_build_info` = 1 for `component` at this version.
fn expect_series(text: &str, component: &str, want: &[(&str, f64)]) -> Result<(), String> {
    let info = format!(
        "canal_build_info{{component=\"{component}\",version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    for (series, v) in want.iter().copied().chain([(info.as_str(), 1.0)]) {
        if value(text, series) != Some(v) {
            return Err(format!("{series} = {:?}, want {v}", value(text, series)));
        }
    }
    Ok(())
}

#[tokio::test]
async fn served_metrics_match_the_readme_and_the_dashboard() {
    let lab = Lab::up(
        Lab::test_state_dir("metrics"),
        UpOptions {
            nodes: 2,
            replace: true,
            ..UpOptions::default()
        },
    )
    .await
    .unwrap();
    lab.namespace("x", &[("ns", "x")]).await.unwrap();
    let mut pod = PodOptions::new("x", "a", "node-1");
    pod.labels.insert("pod".into(), "a".into());
    lab.add_pod(pod).await.unwrap();
    apply_policies(
        &lab.client(),
        "metadata: {name: deny-all, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
    )
    .await;

    // Values that say the scrape reflects the lab: one leader, two subnets,
    // one NetworkPolicy compiled, its pod's chains programmed on node-1.
    let controller = eventually("the controller's metrics", Duration::from_secs(30), || {
        let scraped = lab.controller_metrics();
        async move {
            let text = scraped.map_err(|e| e.to_string())?;
            expect_series(
                &text,
                "controller",
                &[
                    ("canal_controller_leader", 1.0),
                    ("canal_controller_subnets_allocated{family=\"IPv4\"}", 2.0),
                    ("canal_policy_network_policies", 1.0),
                    ("canal_policy_endpoints", 1.0),
                ],
            )?;
            Ok(text)
        }
    })
    .await;
    let agent = eventually("node-1's agent metrics", Duration::from_secs(30), || {
        let scraped = lab.agent_metrics("node-1");
        async move {
            let text = scraped.map_err(|e| e.to_string())?;
            expect_series(
                &text,
                "agent",
                &[
                    (
                        "canal_agent_remote_nodes{family=\"ipv4\",route=\"vxlan\"}",
                        1.0,
                    ),
                    ("canal_policy_programmed_endpoints", 1.0),
                ],
            )?;
            match value(&text, "canal_network_programming_duration_seconds_count") {
                Some(n) if n >= 1.0 => Ok(text),
                other => Err(format!(
                    "canal_network_programming_duration_seconds_count = {other:?}, want >= 1"
                )),
            }
        }
    })
    .await;
    assert!(
        value(&controller, "process_resident_memory_bytes").is_some_and(|b| b > 1e6),
        "the controller serves process metrics"
    );

    let mut served = Families::new();
    let mut clashes = Vec::new();
    for (name, kind) in families(&controller).into_iter().chain(families(&agent)) {
        if let Some(other) = served.insert(name.clone(), kind.clone())
            && other != kind
        {
            clashes.push(format!("{name}: {other} and {kind}"));
        }
    }
    assert!(clashes.is_empty(), "one name, two types: {clashes:?}");
    let served_canal: Families = served
        .iter()
        .filter(|(n, _)| !standard(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();

    let docs = documented();
    let undocumented: Vec<String> = served_canal
        .iter()
        .filter(|(n, _)| !docs.contains_key(*n))
        .map(|(n, t)| format!("{n} ({t})"))
        .collect();
    let unserved: Vec<&String> = docs
        .keys()
        .filter(|n| !served_canal.contains_key(*n))
        .collect();
    let wrong_type: Vec<String> = docs
        .iter()
        .filter_map(|(n, t)| {
            let s = served_canal.get(n)?;
            (s != t).then(|| format!("{n}: README {t}, served {s}"))
        })
        .collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty() && wrong_type.is_empty(),
        "served but not in the README: {undocumented:?}\n\
         in the README but not served: {unserved:?}\n\
         types differ: {wrong_type:?}"
    );

    let missing: Vec<String> = dashboard_metrics(&histograms(&docs))
        .into_iter()
        .filter(|m| !served.contains_key(m))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no binary serves: {missing:?}"
    );
    drop(lab);
}
