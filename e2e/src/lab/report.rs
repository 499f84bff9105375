//! What a failed `up` prints: for each component that is not ready or not
//! running, what is wrong, the path of its log and the last error lines of
//! it, so that the cause (an agent that cannot run iptables-restore, a
//! controller that cannot reach the API server) is on the screen, not only
//! in a file. Log parsing is pure and unit-tested.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::control_plane::Layout;
use crate::lab::state::StateDir;
use crate::process;

/// Error lines shown per component.
pub const ERROR_LINES: usize = 8;

/// Which component a readiness problem is about (whose log explains it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// etcd or kube-apiserver (the name).
    ControlPlane(&'static str),
    /// The API forwarder into the node namespaces.
    Forwarder,
    /// The internet host's echo server.
    InternetEcho,
    /// canal-controller.
    Controller,
    /// canal-agent on a node.
    Agent(String),
    /// The lab as a whole: a consequence of another component's problem,
    /// listed in the error but without a log of its own.
    Lab,
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Component::ControlPlane(name) => f.write_str(name),
            Component::Forwarder => f.write_str("API forwarder"),
            Component::InternetEcho => f.write_str("internet echo server"),
            Component::Controller => f.write_str("canal-controller"),
            Component::Agent(node) => write!(f, "canal-agent on {node}"),
            Component::Lab => f.write_str("the lab"),
        }
    }
}

/// Something that is not ready, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The component whose log explains it.
    pub component: Component,
    /// What is not ready.
    pub text: String,
}

impl Problem {
    /// A problem of `component`.
    pub fn new(component: Component, text: impl Into<String>) -> Problem {
        Problem {
            component,
            text: text.into(),
        }
    }
}

/// A process of the lab: where its log and pid file are.
#[derive(Debug, Clone)]
struct Process {
    component: Component,
    log: PathBuf,
    pid_file: PathBuf,
    program: &'static str,
}

/// Every process the lab in `state` started, as far as its files show.
fn processes(state: &StateDir) -> Vec<Process> {
    let cp = Layout {
        dir: state.control_plane(),
    };
    let mut all = vec![];
    for name in ["etcd", "kube-apiserver"] {
        all.push(Process {
            component: Component::ControlPlane(name),
            log: cp.log(name),
            pid_file: cp.pid_file(name),
            program: name,
        });
    }
    all.push(Process {
        component: Component::Forwarder,
        log: state.log("forwarder"),
        pid_file: state.pid_file("forwarder"),
        program: "canal-lab",
    });
    all.push(Process {
        component: Component::InternetEcho,
        log: state.internet().log(),
        pid_file: state.internet().pid(),
        program: "canal-lab",
    });
    all.push(Process {
        component: Component::Controller,
        log: state.log("controller"),
        pid_file: state.pid_file("controller"),
        program: "canal-controller",
    });
    for node in state.nodes().unwrap_or_default() {
        let agent = state.node(&node.name).agent();
        all.push(Process {
            component: Component::Agent(node.name.clone()),
            log: agent.log(),
            pid_file: agent.pid(),
            program: "canal-agent",
        });
    }
    // Only what was started: its pid file or log exists.
    all.retain(|p| p.pid_file.exists() || p.log.exists());
    all
}

/// The report for a failed `up`, taken while the processes still run: each
/// component with a problem, and each started one that is not running.
pub fn render(state: &StateDir, problems: &[Problem]) -> String {
    let mut by_component: BTreeMap<&Component, Vec<&str>> = BTreeMap::new();
    for p in problems {
        by_component.entry(&p.component).or_default().push(&p.text);
    }
    let mut out = String::new();
    for proc in processes(state) {
        let running = process::live_pid(&proc.pid_file, proc.program).is_some();
        let said = by_component.remove(&proc.component);
        if running && said.is_none() {
            continue;
        }
        let what = match said {
            Some(texts) if running => texts.join("; "),
            Some(texts) if texts == ["exited"] => "exited".to_string(),
            Some(texts) => format!("{} (not running)", texts.join("; ")),
            None => "not running".to_string(),
        };
        out.push_str(&format!(
            "{}: {what}\n  log: {}\n",
            proc.component,
            proc.log.display()
        ));
        let text = std::fs::read_to_string(&proc.log).unwrap_or_default();
        let lines = error_lines(&text, ERROR_LINES);
        if lines.is_empty() {
            out.push_str("  (the log is empty)\n");
        }
        for line in lines {
            out.push_str(&format!("  | {line}\n"));
        }
    }
    // Problems of components that never started (no files at all).
    by_component.remove(&Component::Lab);
    for (component, texts) in by_component {
        out.push_str(&format!(
            "{component}: {} (never started)\n",
            texts.join("; ")
        ));
    }
    out
}

/// Removes terminal colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a log line reports an error or a warning, in the formats the
/// lab's processes write: tracing (` ERROR `, ` WARN `), klog (`E1201 ...`,
/// `W1201 ...`), zap JSON (`"level":"error"`), and plain `error:` text.
pub fn is_error_line(line: &str) -> bool {
    let klog = {
        let b = line.as_bytes();
        b.len() > 5 && matches!(b[0], b'E' | b'W' | b'F') && b[1..5].iter().all(u8::is_ascii_digit)
    };
    let lower = line.to_ascii_lowercase();
    klog || line.contains(" ERROR ")
        || line.contains(" WARN ")
        || lower.contains("\"level\":\"error\"")
        || lower.contains("\"level\":\"warn\"")
        || lower.contains("\"level\":\"fatal\"")
        || lower.starts_with("error")
        || lower.contains("panicked at")
}

/// The last `n` distinct error lines of a log, or its last `n` lines when
/// none looks like an error. Lines that differ only in digits (timestamps,
/// attempt counts: a retry loop) count as one, shown once, as last logged,
/// with how often it came (`(x7)`).
pub fn error_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<String> = text.lines().map(strip_ansi).collect();
    let errors: Vec<&String> = lines.iter().filter(|l| is_error_line(l)).collect();
    let chosen: Vec<&String> = if errors.is_empty() {
        lines.iter().collect()
    } else {
        errors
    };
    // Newest first, so each distinct line keeps its last occurrence.
    let shape = |l: &str| {
        l.chars()
            .filter(|c| !c.is_ascii_digit())
            .collect::<String>()
    };
    let mut distinct: Vec<(String, String, usize)> = Vec::new();
    for line in chosen.iter().rev() {
        let key = shape(line);
        match distinct.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, _, count)) => *count += 1,
            None => distinct.push((key, line.to_string(), 1)),
        }
    }
    distinct.truncate(n);
    distinct
        .into_iter()
        .rev()
        .map(|(_, line, count)| {
            if count > 1 {
                format!("{line} (x{count})")
            } else {
                line
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_of_every_format() {
        let log = "\u{1b}[2m2025-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m canal_agent: started\n\
                   2025-01-01T00:00:01Z \u{1b}[31mERROR\u{1b}[0m canal_agent::policy: iptables-restore: No such file or directory\n\
                   I1201 09:00:00.000000 1 server.go:1] serving\n\
                   E1201 09:00:01.000000 1 server.go:2] etcd unreachable\n\
                   {\"level\":\"warn\",\"msg\":\"slow fdatasync\"}\n\
                   2025-01-01T00:00:02Z  WARN canal_agent: retrying in 1s\n\
                   Error: unknown flag --x\n";
        assert_eq!(
            error_lines(log, 8),
            [
                "2025-01-01T00:00:01Z ERROR canal_agent::policy: iptables-restore: No such file or directory",
                "E1201 09:00:01.000000 1 server.go:2] etcd unreachable",
                "{\"level\":\"warn\",\"msg\":\"slow fdatasync\"}",
                "2025-01-01T00:00:02Z  WARN canal_agent: retrying in 1s",
                "Error: unknown flag --x",
            ]
        );
        assert_eq!(error_lines(log, 2).len(), 2);
        assert_eq!(error_lines(log, 2)[1], "Error: unknown flag --x");
    }

    #[test]
    fn a_retry_loop_is_one_line_with_a_count() {
        let log = "2025-01-01T00:00:01Z ERROR sync failed: iptables-save: not found attempts=1\n\
                   2025-01-01T00:00:02Z  WARN giving up on this round\n\
                   2025-01-01T00:00:03Z ERROR sync failed: iptables-save: not found attempts=2\n\
                   2025-01-01T00:00:09Z ERROR sync failed: iptables-save: not found attempts=3\n";
        assert_eq!(
            error_lines(log, 8),
            [
                "2025-01-01T00:00:02Z  WARN giving up on this round",
                "2025-01-01T00:00:09Z ERROR sync failed: iptables-save: not found attempts=3 (x3)",
            ]
        );
        assert_eq!(error_lines(log, 1).len(), 1);
    }

    #[test]
    fn without_error_lines_the_tail_is_shown() {
        let log = "a\nb\nc\n";
        assert_eq!(error_lines(log, 2), ["b", "c"]);
        assert!(error_lines("", 2).is_empty());
        // Informational klog and tracing lines are not errors.
        assert!(!is_error_line("I1201 09:00:00 x"));
        assert!(!is_error_line("2025 INFO canal: WARNING-free"));
    }

    #[test]
    fn components_print_as_people_read_them() {
        assert_eq!(
            Component::Agent("node-1".into()).to_string(),
            "canal-agent on node-1"
        );
        assert_eq!(
            Component::ControlPlane("kube-apiserver").to_string(),
            "kube-apiserver"
        );
    }
}
