//! Connectivity truth tables: every pod to every pod on one port and
//! protocol. The table, its JSON form and the expected-vs-observed report
//! are pure; [`run_probes`] runs the probes in parallel with bounded
//! concurrency, each on a worker thread moved into the source pod's
//! namespace.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::Error;
use crate::lab::netns;
use crate::lab::probe::{self, ProbeOutcome};
use crate::lab::protocol::Protocol;

/// Default number of probes in flight: a whole 9x9 conformance table at
/// once, so a table with blocked cells costs one probe timeout, not nine.
pub const DEFAULT_CONCURRENCY: usize = 100;

/// A truth table over pods (`namespace/name`): may `from` reach `to`?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pods: Vec<String>,
    cells: BTreeMap<(String, String), bool>,
}

/// One cell where two tables disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Source pod.
    pub from: String,
    /// Destination pod.
    pub to: String,
    /// The expected value.
    pub expected: bool,
    /// The observed value (None: missing in the observed table).
    pub observed: Option<bool>,
}

impl Matrix {
    /// A table over `pods` (sorted, deduplicated) with every cell `value`.
    pub fn filled(pods: impl IntoIterator<Item = impl Into<String>>, value: bool) -> Matrix {
        let mut pods: Vec<String> = pods.into_iter().map(Into::into).collect();
        pods.sort();
        pods.dedup();
        let cells = pods
            .iter()
            .flat_map(|f| pods.iter().map(move |t| ((f.clone(), t.clone()), value)))
            .collect();
        Matrix { pods, cells }
    }

    /// The pods, sorted.
    pub fn pods(&self) -> &[String] {
        &self.pods
    }

    /// Sets one cell (the pods must be in the table).
    pub fn set(&mut self, from: &str, to: &str, value: bool) {
        if let Some(cell) = self.cells.get_mut(&(from.to_string(), to.to_string())) {
            *cell = value;
        }
    }

    /// Sets every cell from `from`.
    pub fn set_row(&mut self, from: &str, value: bool) {
        for to in self.pods.clone() {
            self.set(from, &to, value);
        }
    }

    /// Sets every cell to `to`.
    pub fn set_column(&mut self, to: &str, value: bool) {
        for from in self.pods.clone() {
            self.set(&from, to, value);
        }
    }

    /// One cell.
    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.cells.get(&(from.to_string(), to.to_string())).copied()
    }

    /// Number of reachable pairs.
    pub fn connected(&self) -> usize {
        self.cells.values().filter(|v| **v).count()
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether the table has no pairs.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// `{"ns/from": {"ns/to": true|false}}`.
    pub fn to_json(&self) -> Value {
        let mut rows = Map::new();
        for from in &self.pods {
            let row: Map<String, Value> = self
                .pods
                .iter()
                .map(|to| (to.clone(), Value::Bool(self.get(from, to).unwrap_or(false))))
                .collect();
            rows.insert(from.clone(), Value::Object(row));
        }
        Value::Object(rows)
    }

    /// Reads the JSON form back.
    pub fn from_json(value: &Value) -> Result<Matrix, String> {
        let rows = value.as_object().ok_or("not an object")?;
        let mut m = Matrix::filled(rows.keys().cloned(), false);
        for (from, row) in rows {
            let row = row
                .as_object()
                .ok_or_else(|| format!("row {from} is not an object"))?;
            for (to, v) in row {
                let v = v
                    .as_bool()
                    .ok_or_else(|| format!("{from} -> {to} is not a boolean"))?;
                if !m.pods.contains(to) {
                    return Err(format!("{to} appears as a column but not as a row"));
                }
                m.set(from, to, v);
            }
        }
        Ok(m)
    }

    /// The cells where `self` (observed) differs from `expected`.
    pub fn mismatches(&self, expected: &Matrix) -> Vec<Mismatch> {
        expected
            .cells
            .iter()
            .filter_map(|((from, to), want)| {
                let got = self.get(from, to);
                (got != Some(*want)).then(|| Mismatch {
                    from: from.clone(),
                    to: to.clone(),
                    expected: *want,
                    observed: got,
                })
            })
            .collect()
    }

    /// A table: rows are sources, columns destinations; `.` reachable, `X`
    /// blocked (the upstream NetworkPolicy e2e convention).
    pub fn render(&self) -> String {
        self.render_with(|from, to| match self.get(from, to) {
            Some(true) => ".".into(),
            Some(false) => "X".into(),
            None => "?".into(),
        })
    }

    fn render_with(&self, cell: impl Fn(&str, &str) -> String) -> String {
        let width = self.pods.iter().map(String::len).max().unwrap_or(0).max(7);
        let mut out = format!("{:width$}", "from\\to");
        for to in &self.pods {
            out.push_str(&format!(" {to:>width$}"));
        }
        out.push('\n');
        for from in &self.pods {
            out.push_str(&format!("{from:width$}"));
            for to in &self.pods {
                out.push_str(&format!(" {:>width$}", cell(from, to)));
            }
            out.push('\n');
        }
        out
    }

    /// Expected, observed, and the differences, for a failing test.
    pub fn report(expected: &Matrix, observed: &Matrix) -> String {
        let mismatches = observed.mismatches(expected);
        let mut out = format!(
            "expected:\n{}\nobserved:\n{}\ncomparison ('.' agrees, 'X' differs):\n{}",
            expected.render(),
            observed.render(),
            expected.render_with(|f, t| {
                if observed.get(f, t) == expected.get(f, t) {
                    ".".into()
                } else {
                    "X".into()
                }
            })
        );
        for m in &mismatches {
            out.push_str(&format!(
                "  {} -> {}: expected {}, observed {}\n",
                m.from,
                m.to,
                word(Some(m.expected)),
                word(m.observed)
            ));
        }
        out
    }
}

fn word(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "connected",
        Some(false) => "blocked",
        None => "nothing",
    }
}

/// One probe to run.
#[derive(Debug, Clone)]
pub struct ProbeJob {
    /// Source, `ns/name`.
    pub from: String,
    /// The source's network namespace.
    pub netns: String,
    /// Destination, `ns/name`.
    pub to: String,
    /// Destination address and port.
    pub dst: SocketAddr,
}

/// Runs `jobs` with at most `concurrency` in flight; results come back in
/// the order of `jobs`.
pub fn run_probes(
    jobs: &[ProbeJob],
    protocol: Protocol,
    timeout: Duration,
    concurrency: usize,
) -> Vec<Result<ProbeOutcome, Error>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<ProbeOutcome, Error>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let workers = concurrency.clamp(1, jobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    // Each worker is a thread of our own: moving it between
                    // namespaces affects nothing else.
                    let outcome = netns::enter(&job.netns)
                        .and_then(|()| probe::probe_here(job.dst, protocol, timeout));
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(outcome);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Lab("probe did not run".into()))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<&'static str> {
        vec!["x/b", "x/a", "y/a"]
    }

    #[test]
    fn tables_are_sorted_and_json_round_trips() {
        let mut m = Matrix::filled(pods(), true);
        assert_eq!(m.pods(), ["x/a", "x/b", "y/a"]);
        m.set("x/a", "y/a", false);
        assert_eq!(m.get("x/a", "y/a"), Some(false));
        assert_eq!(m.connected(), 8);
        let json = m.to_json();
        assert_eq!(json["x/a"]["y/a"], false);
        assert_eq!(json["y/a"]["x/a"], true);
        assert_eq!(Matrix::from_json(&json).unwrap(), m);
    }

    #[test]
    fn bad_json_is_refused() {
        assert!(Matrix::from_json(&serde_json::json!([])).is_err());
        assert!(Matrix::from_json(&serde_json::json!({"a": {"b": true}})).is_err());
        assert!(Matrix::from_json(&serde_json::json!({"a": {"a": 1}})).is_err());
    }

    #[test]
    fn mismatches_and_report() {
        let expected = {
            let mut m = Matrix::filled(pods(), true);
            m.set_column("y/a", false);
            m
        };
        let observed = Matrix::filled(pods(), true);
        let diff = observed.mismatches(&expected);
        assert_eq!(diff.len(), 3);
        assert!(
            diff.iter()
                .all(|d| d.to == "y/a" && !d.expected && d.observed == Some(true))
        );
        assert!(expected.mismatches(&expected).is_empty());
        let report = Matrix::report(&expected, &observed);
        assert!(report.contains("x/a -> y/a: expected blocked, observed connected"));
        assert!(report.contains("observed:"));
    }

    #[test]
    fn rendering() {
        let mut m = Matrix::filled(["x/a", "x/b"], true);
        m.set_row("x/b", false);
        let text = m.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(words(lines[0]), ["from\\to", "x/a", "x/b"], "{text}");
        assert_eq!(words(lines[1]), ["x/a", ".", "."], "{text}");
        assert_eq!(words(lines[2]), ["x/b", "X", "X"], "{text}");
    }
}
