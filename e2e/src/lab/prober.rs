//! A probe loop: one source namespace, one destination, every attempt
//! recorded with its start time, until stopped. Tests and benchmarks read
//! the attempts to see when traffic was blocked or let through while
//! something changed (a policy created, an agent restarted, a pod added).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lab::{Protocol, netns, probe};

/// One probe of a [`Prober`].
#[derive(Clone, Debug)]
pub struct Attempt {
    /// When it started.
    pub at: Instant,
    /// The echo server answered.
    pub connected: bool,
    /// The destination's stack answered with a refusal (TCP RST or ICMP
    /// port unreachable): a packet reached the pod, nothing listened.
    pub refused: bool,
}

/// Probes one destination from one pod's namespace in a loop, recording
/// every attempt, until stopped.
pub struct Prober {
    /// What it probes, for messages.
    pub label: String,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    /// Starts probing `dst` from namespace `netns` every `gap` (after the
    /// previous probe ended), each probe giving up after `timeout`.
    pub fn start(
        label: &str,
        netns: &str,
        dst: SocketAddr,
        protocol: Protocol,
        timeout: Duration,
        gap: Duration,
    ) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, attempts, netns) = (stop.clone(), attempts.clone(), netns.to_string());
            std::thread::spawn(move || {
                if let Err(e) = netns::enter(&netns) {
                    tracing::error!("prober: {e}");
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let outcome = probe::probe_here(dst, protocol, timeout);
                    let (connected, refused) = match &outcome {
                        Ok(o) => (o.connected, o.detail.contains("refused")),
                        Err(_) => (false, false),
                    };
                    attempts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Attempt {
                            at,
                            connected,
                            refused,
                        });
                    std::thread::sleep(gap);
                }
            })
        };
        Prober {
            label: label.to_string(),
            stop,
            attempts,
            thread: Some(thread),
        }
    }

    /// Every attempt so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Attempts started at or after `t`.
    pub fn since(&self, t: Instant) -> Vec<Attempt> {
        self.attempts().into_iter().filter(|a| a.at >= t).collect()
    }

    /// Stops and returns every attempt.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.attempts()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
