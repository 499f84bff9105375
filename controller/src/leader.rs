//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's
//! semantics:
//! - a candidate takes the Lease when it is free, or when its record has
//!   not changed for `leaseDurationSeconds` *as measured on the candidate's
//!   own monotonic clock* (no trust in other machines' wall clocks);
//! - every write is a replace carrying the resourceVersion read, so two
//!   candidates can never both win;
//! - the leader renews every `retry_period` and steps down on its own when
//!   no renewal succeeded for `renew_deadline`, which is shorter than the
//!   lease duration: it stops writing before anyone else may start.
//!
//! Why not kube-lease-manager: its watch loop logs a failed renewal and
//! keeps reporting "leader" until it reaches the API server again, so a
//! partitioned leader would go on writing after its Lease expired; the
//! contract here is that a lost Lease stops writing at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::oneshot;

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (holderIdentity).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
}

/// Bad election settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The timings cannot guarantee a single leader.
    #[error(
        "leader election needs retry period ({retry:?}) < renew deadline ({renew:?}) < lease duration ({duration:?})"
    )]
    Timings {
        retry: Duration,
        renew: Duration,
        duration: Duration,
    },
}

impl LeaseConfig {
    /// Checks retry < renew deadline < duration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.retry_period.is_zero()
            || self.retry_period >= self.renew_deadline
            || self.renew_deadline >= self.duration
        {
            return Err(ConfigError::Timings {
                retry: self.retry_period,
                renew: self.renew_deadline,
                duration: self.duration,
            });
        }
        Ok(())
    }
}

/// What a candidate may do with a Lease it has observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// We hold it: renew.
    Mine,
    /// Nobody holds it: take it.
    Free,
    /// Its holder stopped renewing: take it.
    Expired {
        /// The previous holder.
        holder: String,
    },
    /// Someone else holds it.
    Held {
        /// The holder.
        holder: String,
        /// Time left before it may be taken.
        left: Duration,
    },
}

/// Judges a Lease record whose content was first seen at `observed` (local
/// monotonic time) and has not changed since.
pub fn judge(
    holder: Option<&str>,
    duration: Duration,
    me: &str,
    observed: Instant,
    now: Instant,
) -> Verdict {
    match holder.filter(|h| !h.is_empty()) {
        None => Verdict::Free,
        Some(h) if h == me => Verdict::Mine,
        Some(h) => {
            let expires = observed + duration;
            if now >= expires {
                Verdict::Expired {
                    holder: h.to_string(),
                }
            } else {
                Verdict::Held {
                    holder: h.to_string(),
                    left: expires - now,
                }
            }
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease now.
    Leading,
    /// Someone else holds it.
    Following(String),
    /// Another writer changed the Lease between our read and write.
    Conflict,
}

/// Why leadership ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldEnd {
    /// Another replica holds the Lease.
    Taken(String),
    /// No renewal succeeded within the renew deadline.
    DeadlineExceeded,
    /// We were asked to stop (shutdown); the Lease is released.
    Stopped,
}

/// A failed Lease request.
#[derive(Debug, thiserror::Error)]
#[error("Lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    namespace: String,
    name: String,
    #[source]
    source: kube::Error,
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// resourceVersion of the record last seen and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    /// An elector for `cfg` (validated by the caller).
    pub fn new(client: Client, cfg: LeaseConfig) -> Elector {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.name.clone(),
            source,
        }
    }

    fn record(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let mine = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.cfg.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration.as_secs().max(1) as i32),
            acquire_time: if mine {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..previous.cloned().unwrap_or_default()
        }
    }

    /// One read-judge-write round.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        let now = Instant::now();
        let Some(current) = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(|e| self.err(e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.record(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observed = created.metadata.resource_version.map(|rv| (rv, now));
                    Ok(Attempt::Leading)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(self.err(e)),
            };
        };
        let rv = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let observed_at = match &self.observed {
            Some((seen, at)) if *seen == rv => *at,
            _ => {
                self.observed = Some((rv, now));
                now
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.cfg.duration);
        match judge(
            spec.holder_identity.as_deref(),
            duration,
            &self.cfg.identity,
            observed_at,
            now,
        ) {
            Verdict::Held { holder, .. } => return Ok(Attempt::Following(holder)),
            Verdict::Expired { holder } => {
                tracing::info!(%holder, "the Lease holder stopped renewing; taking over");
            }
            Verdict::Mine | Verdict::Free => {}
        }
        let mut lease = current;
        lease.spec = Some(self.record(Some(&spec)));
        lease.metadata.managed_fields = None;
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observed = updated.metadata.resource_version.map(|rv| (rv, now));
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Returns once this replica holds the Lease.
    pub async fn acquire(&mut self) {
        loop {
            match tokio::time::timeout(self.cfg.retry_period, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => return,
                Ok(Ok(Attempt::Following(holder))) => {
                    tracing::debug!(%holder, "another replica leads");
                }
                Ok(Ok(Attempt::Conflict)) => tracing::debug!("lost a race for the Lease"),
                Ok(Err(e)) => tracing::warn!("leader election: {e}"),
                Err(_) => tracing::warn!("leader election: the API server did not answer in time"),
            }
            tokio::time::sleep(jitter(self.cfg.retry_period)).await;
        }
    }

    /// Renews the Lease until it is lost or `stop` fires (then releases it).
    pub async fn hold(&mut self, mut stop: oneshot::Receiver<()>) -> HoldEnd {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => {
                    self.release().await;
                    return HoldEnd::Stopped;
                }
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
            let started = Instant::now();
            let left = (last_renewal + self.cfg.renew_deadline).saturating_duration_since(started);
            if left.is_zero() {
                return HoldEnd::DeadlineExceeded;
            }
            let attempt = tokio::select! {
                _ = &mut stop => {
                    self.release().await;
                    return HoldEnd::Stopped;
                }
                r = tokio::time::timeout(left, self.try_acquire_or_renew()) => r,
            };
            match attempt {
                // The Lease counts from when the request left, not when it came back.
                Ok(Ok(Attempt::Leading)) => last_renewal = started,
                Ok(Ok(Attempt::Following(holder))) => return HoldEnd::Taken(holder),
                Ok(Ok(Attempt::Conflict)) => {
                    tracing::warn!("renewing the Lease: write conflict, retrying")
                }
                Ok(Err(e)) => tracing::warn!("renewing the Lease: {e}"),
                Err(_) => return HoldEnd::DeadlineExceeded,
            }
        }
    }

    /// Gives the Lease up if we hold it, so a standby takes over at once.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.metadata.managed_fields = None;
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!("released the Lease"),
            Err(e) => tracing::warn!("releasing the Lease: {}", self.err(e)),
        }
    }
}

/// `period` stretched by up to 20%, from the clock's low bits (spreads
/// candidates apart without a random number generator).
fn jitter(period: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    period + period.mul_f64(f64::from(nanos % 1000) / 5000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(10);

    #[test]
    fn judges_leases_like_client_go() {
        let t0 = Instant::now();
        assert_eq!(judge(None, D, "me", t0, t0), Verdict::Free);
        assert_eq!(judge(Some(""), D, "me", t0, t0), Verdict::Free);
        assert_eq!(judge(Some("me"), D, "me", t0, t0 + D * 5), Verdict::Mine);
        assert_eq!(
            judge(Some("other"), D, "me", t0, t0 + Duration::from_secs(4)),
            Verdict::Held {
                holder: "other".into(),
                left: Duration::from_secs(6)
            }
        );
        assert_eq!(
            judge(Some("other"), D, "me", t0, t0 + D),
            Verdict::Expired {
                holder: "other".into()
            }
        );
    }

    #[test]
    fn timings_must_leave_a_gap() {
        let mut cfg = LeaseConfig {
            namespace: "kube-system".into(),
            name: "canal-controller".into(),
            identity: "a".into(),
            duration: D,
            renew_deadline: Duration::from_secs(7),
            retry_period: Duration::from_secs(2),
        };
        assert!(cfg.validate().is_ok());
        cfg.renew_deadline = D;
        assert!(cfg.validate().is_err());
        cfg.renew_deadline = Duration::from_secs(1);
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let p = Duration::from_secs(2);
        let j = jitter(p);
        assert!(j >= p && j <= p + p / 5, "{j:?}");
    }
}
