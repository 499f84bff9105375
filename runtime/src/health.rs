//! Liveness and readiness flags shared between a component's tasks and its
//! HTTP endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Liveness (`/healthz`) and readiness (`/readyz`) of a component. Cheap to
/// clone; every clone sees the same flags.
///
/// Readiness is the main flag ([`set_ready`](Health::set_ready)) AND every
/// [`ReadinessGate`] handed out by [`gate`](Health::gate), so a process made
/// of several parts (canal-agent: the overlay and policy enforcement) is
/// ready only once each part has done its first full sync.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Flags>,
}

#[derive(Debug)]
struct Flags {
    live: AtomicBool,
    ready: AtomicBool,
    /// Why the main flag is down, for the `/readyz` body.
    reason: Mutex<Option<String>>,
    gates: Mutex<Vec<ReadinessGate>>,
}

/// One part's readiness; closed until that part opens it.
#[derive(Clone, Debug)]
pub struct ReadinessGate {
    name: &'static str,
    open: Arc<AtomicBool>,
}

impl ReadinessGate {
    /// Opens (ready) or closes (not ready) the gate.
    pub fn set(&self, open: bool) {
        self.open.store(open, Ordering::Release);
    }

    /// Is it open?
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The part it stands for.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// Live, not ready: readiness is earned (for the agent, by a first full sync).
    pub fn new() -> Health {
        Health {
            inner: Arc::new(Flags {
                live: AtomicBool::new(true),
                ready: AtomicBool::new(false),
                reason: Mutex::new(None),
                gates: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Marks the component ready or not (without a reason; see
    /// [`set_not_ready`](Health::set_not_ready)).
    pub fn set_ready(&self, ready: bool) {
        *self.reason() = None;
        self.inner.ready.store(ready, Ordering::Release);
    }

    /// Marks the component not ready because of `reason`, which `/readyz`
    /// shows so whoever looks at a failing probe learns why.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.reason() = Some(reason.into());
        self.inner.ready.store(false, Ordering::Release);
    }

    /// Why the main flag is down, if a reason was given.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.inner.ready.load(Ordering::Acquire) {
            return None;
        }
        self.reason().clone()
    }

    fn reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // Only ever replaced whole; a panic elsewhere cannot corrupt it.
        self.inner.reason.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the component live or not (not live: a restart is wanted).
    pub fn set_live(&self, live: bool) {
        self.inner.live.store(live, Ordering::Release);
    }

    /// A new, closed gate that readiness also waits for.
    pub fn gate(&self, name: &'static str) -> ReadinessGate {
        let gate = ReadinessGate {
            name,
            open: Arc::new(AtomicBool::new(false)),
        };
        self.gates().push(gate.clone());
        gate
    }

    fn gates(&self) -> std::sync::MutexGuard<'_, Vec<ReadinessGate>> {
        // The list is only pushed to; a panic elsewhere cannot corrupt it.
        self.inner.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What readiness still waits for: "main" for the main flag, then the
    /// names of closed gates. Empty when ready.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.inner.ready.load(Ordering::Acquire) {
            out.push("main");
        }
        out.extend(self.gates().iter().filter(|g| !g.is_open()).map(|g| g.name));
        out
    }

    /// Ready (the main flag and every gate)?
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire) && self.gates().iter().all(|g| g.is_open())
    }

    /// Live?
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_the_main_flag_and_every_gate() {
        let h = Health::new();
        let policy = h.gate("policy");
        assert!(!h.is_ready());
        assert_eq!(h.waiting_for(), ["main", "policy"]);
        h.set_ready(true);
        assert!(!h.is_ready());
        assert_eq!(h.waiting_for(), ["policy"]);
        policy.set(true);
        assert!(h.is_ready());
        assert!(h.waiting_for().is_empty());
        policy.set(false);
        assert!(!h.is_ready());
    }

    #[test]
    fn a_reason_lasts_while_not_ready() {
        let h = Health::new();
        assert_eq!(h.not_ready_reason(), None);
        h.set_not_ready("routes failed");
        assert!(!h.is_ready());
        assert_eq!(h.not_ready_reason().as_deref(), Some("routes failed"));
        h.set_ready(true);
        assert!(h.is_ready());
        assert_eq!(h.not_ready_reason(), None);
        h.set_ready(false);
        assert_eq!(h.not_ready_reason(), None, "set_ready clears the reason");
    }
}
