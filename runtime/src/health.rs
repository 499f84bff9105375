//! Liveness and readiness flags shared between a component's tasks and its
//! HTTP endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Liveness (`/healthz`) and readiness (`/readyz`) of a component. Cheap to
/// clone; every clone sees the same flags.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Flags>,
}

#[derive(Debug)]
struct Flags {
    live: AtomicBool,
    ready: AtomicBool,
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
            }),
        }
    }

    /// Marks the component ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Release);
    }

    /// Marks the component live or not (not live: a restart is wanted).
    pub fn set_live(&self, live: bool) {
        self.inner.live.store(live, Ordering::Release);
    }

    /// Ready?
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Live?
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }
}
