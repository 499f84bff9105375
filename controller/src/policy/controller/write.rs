//! One write pass: the flush's changes in dependency order, each object
//! rendered and size-checked just before its request, `write_concurrency`
//! requests at a time.
//!
//! Order: PeerSet slices, PeerSet heads, PolicyGroup slices, PolicyGroup
//! heads, NodePolicySets, then deletions (NodePolicySets, PolicyGroups,
//! PeerSets). A head is held back while any of its slices is not written as
//! it should be, a NodePolicySet while any PolicyGroup it names is not, and
//! a slice no head lists any more is deleted only once its head is current:
//! the cluster only ever holds consistent versions, so an agent (even one
//! that restarts) always finds one.

use std::sync::Arc;
use std::time::Instant;

use canal_crds::{NodePolicySet, PeerSet, PolicyGroup};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use tracing::warn;

use super::{Controller, FIELD_MANAGER};
use crate::policy::index::{Change, Changes, Kind};
use crate::policy::objects::{self, EncodeError, Outgoing};
use crate::policy::problems::{Problem, REJECTED, TOO_LARGE};

/// Why one object could not be written.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    /// Building the body failed, or it is over the bound.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The API server refused or could not be reached.
    #[error(transparent)]
    Api(kube::Error),
}

/// Names of objects to write.
type Names = Vec<Arc<str>>;

/// An object name and the outcome of applying it (the fingerprint written,
/// or None when there was nothing left to write).
type WriteResult = (Arc<str>, Result<Option<u128>, WriteError>);

/// Applies of slices, applies of heads, deletions.
fn split(kind: Kind, changes: &[Change]) -> (Names, Names, Names) {
    let (mut slices, mut heads, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
    for c in changes {
        match c {
            Change::Apply(n) if kind.head_of(n) != &**n => slices.push(n.clone()),
            Change::Apply(n) => heads.push(n.clone()),
            Change::Delete(n) => deletes.push(n.clone()),
        }
    }
    (slices, heads, deletes)
}

async fn send(client: &Client, kind: Kind, name: &str, body: &Outgoing) -> Result<(), kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&*body.body);
    match kind {
        Kind::PeerSet => Api::<PeerSet>::all(client.clone())
            .patch(name, &pp, &patch)
            .await
            .map(drop),
        Kind::PolicyGroup => Api::<PolicyGroup>::all(client.clone())
            .patch(name, &pp, &patch)
            .await
            .map(drop),
        Kind::NodePolicySet => Api::<NodePolicySet>::all(client.clone())
            .patch(name, &pp, &patch)
            .await
            .map(drop),
    }
}

async fn remove(client: &Client, kind: Kind, name: &str) -> Result<(), kube::Error> {
    let dp = DeleteParams::default();
    let r = match kind {
        Kind::PeerSet => Api::<PeerSet>::all(client.clone())
            .delete(name, &dp)
            .await
            .map(drop),
        Kind::PolicyGroup => Api::<PolicyGroup>::all(client.clone())
            .delete(name, &dp)
            .await
            .map(drop),
        Kind::NodePolicySet => Api::<NodePolicySet>::all(client.clone())
            .delete(name, &dp)
            .await
            .map(drop),
    };
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

impl Kind {
    /// The `stage` label of writing objects of this kind.
    fn write_stage(self) -> &'static str {
        match self {
            Kind::PeerSet => "write_peersets",
            Kind::PolicyGroup => "write_policygroups",
            Kind::NodePolicySet => "write_nodepolicysets",
        }
    }
}

/// A refusal that retrying the same body will not fix.
fn is_rejection(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 409 && s.code != 429)
}

impl Controller {
    /// Writes in the order that never leaves a dangling reference. Returns
    /// false when some write failed or was held back (it will be retried).
    pub(super) async fn write(&mut self, changes: &Changes) -> bool {
        let Some(uid) = self.owner_uid().map(str::to_string) else {
            // `sync` checked; a batch without an owner waits for the next.
            for kind in [Kind::PeerSet, Kind::PolicyGroup, Kind::NodePolicySet] {
                for c in changes.of(kind) {
                    self.index.retry(kind, c.name());
                }
            }
            return false;
        };
        let owner = objects::owner_reference(&uid);
        let mut ok = true;
        let mut deletes = Vec::new();
        for kind in [Kind::PeerSet, Kind::PolicyGroup] {
            let (slices, heads, dels) = split(kind, changes.of(kind));
            let t = Instant::now();
            let any = !slices.is_empty() || !heads.is_empty();
            ok &= self.apply(kind, slices, &owner).await;
            let (ready, held): (Vec<_>, Vec<_>) = heads
                .into_iter()
                .partition(|h| self.index.slices_current(kind, h));
            ok &= self.hold(kind, held);
            ok &= self.apply(kind, ready, &owner).await;
            if any {
                self.observe_stage(kind.write_stage(), t);
            }
            deletes.push((kind, dels));
        }
        let (applies, nps_deletes) = {
            let (_, heads, dels) = split(Kind::NodePolicySet, changes.of(Kind::NodePolicySet));
            (heads, dels)
        };
        let (ready, held): (Vec<_>, Vec<_>) = applies
            .into_iter()
            .partition(|n| self.index.groups_not_current(n).is_empty());
        ok &= self.hold(Kind::NodePolicySet, held);
        if !ready.is_empty() {
            let t = Instant::now();
            ok &= self.apply(Kind::NodePolicySet, ready, &owner).await;
            self.observe_stage(Kind::NodePolicySet.write_stage(), t);
        }
        let t = Instant::now();
        let any_deletes =
            !nps_deletes.is_empty() || deletes.iter().any(|(_, d): &(Kind, Names)| !d.is_empty());
        ok &= self.delete(Kind::NodePolicySet, nps_deletes).await;
        for (kind, dels) in deletes.into_iter().rev() {
            // A slice of a head that is still wanted goes only once that
            // head no longer lists it (is current).
            let (ready, held): (Vec<_>, Vec<_>) = dels.into_iter().partition(|n| {
                let head = kind.head_of(n);
                head == &**n
                    || self.index.desired_fingerprint(kind, head).is_none()
                    || self.index.is_current(kind, head)
            });
            ok &= self.hold(kind, held);
            ok &= self.delete(kind, ready).await;
        }
        if any_deletes {
            self.observe_stage("write_deletions", t);
        }
        // Problems of objects no longer wanted are over.
        let index = &self.index;
        let gone: Vec<(Kind, String)> = self
            .problems
            .iter()
            .filter(|p| index.desired_fingerprint(p.kind, &p.name).is_none())
            .map(|p| (p.kind, p.name.clone()))
            .collect();
        for (kind, name) in gone {
            self.problems.clear(kind, &name);
        }
        self.metrics
            .unwritable_objects
            .set(i64::try_from(self.problems.len()).unwrap_or(i64::MAX));
        ok
    }

    fn observe_stage(&self, stage: &str, since: Instant) {
        self.metrics
            .stage_seconds
            .with_label_values(&[stage])
            .observe(since.elapsed().as_secs_f64());
    }

    /// Writes held back for a dependency: retried with the next pass.
    fn hold(&mut self, kind: Kind, names: Vec<Arc<str>>) -> bool {
        for n in &names {
            self.index.retry(kind, n);
        }
        names.is_empty()
    }

    /// Server-side applies the named objects, `write_concurrency` at a time.
    /// Each is rendered and encoded just before its request, so at most that
    /// many exist at once however large the batch.
    async fn apply(&mut self, kind: Kind, names: Vec<Arc<str>>, owner: &OwnerReference) -> bool {
        if names.is_empty() {
            return true;
        }
        let index = &self.index;
        let client = &self.client;
        let bytes = &self.metrics.object_bytes;
        let results: Vec<WriteResult> = futures::stream::iter(names)
            .map(|name| {
                let outgoing = objects::encode_object(index, kind, &name, owner);
                async move {
                    let result = match outgoing {
                        None => Ok(None),
                        Some(Err(e)) => Err(WriteError::Encode(e)),
                        Some(Ok(o)) => {
                            bytes.observe(o.body.get().len() as f64);
                            send(client, kind, &name, &o)
                                .await
                                .map(|()| Some(o.fingerprint))
                                .map_err(WriteError::Api)
                        }
                    };
                    (name, result)
                }
            })
            .buffer_unordered(self.options.write_concurrency.max(1))
            .collect()
            .await;
        let mut ok = true;
        for (name, result) in results {
            match result {
                Ok(Some(fp)) => {
                    self.index.mark_written(kind, &name, Some(fp));
                    self.problems.clear(kind, &name);
                    self.owners
                        .insert((kind, name.to_string()), Some(owner.uid.clone()));
                    self.metrics
                        .objects_written
                        .with_label_values(&[kind.as_str(), "apply"])
                        .inc();
                }
                Ok(None) => {}
                Err(e) => {
                    ok = false;
                    self.index.retry(kind, &name);
                    let reason = match &e {
                        WriteError::Encode(EncodeError::TooLarge { .. }) => {
                            self.metrics
                                .errors
                                .with_label_values(&["object_too_large"])
                                .inc();
                            Some(TOO_LARGE)
                        }
                        WriteError::Api(api) if is_rejection(api) => {
                            self.metrics.errors.with_label_values(&["apply"]).inc();
                            Some(REJECTED)
                        }
                        _ => {
                            self.metrics.errors.with_label_values(&["apply"]).inc();
                            None
                        }
                    };
                    warn!(kind = kind.as_str(), name = %name, error = %e, "writing failed; the nodes that need it keep their previous policy; will retry");
                    if let Some(reason) = reason {
                        self.problems.record(Problem {
                            kind,
                            name: name.to_string(),
                            reason,
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
        ok
    }

    async fn delete(&mut self, kind: Kind, names: Vec<Arc<str>>) -> bool {
        if names.is_empty() {
            return true;
        }
        let client = &self.client;
        let results: Vec<(Arc<str>, Result<(), kube::Error>)> = futures::stream::iter(names)
            .map(|name| async move {
                let r = remove(client, kind, &name).await;
                (name, r)
            })
            .buffer_unordered(self.options.write_concurrency.max(1))
            .collect()
            .await;
        let mut ok = true;
        for (name, result) in results {
            match result {
                Ok(()) => {
                    self.index.mark_written(kind, &name, None);
                    self.problems.clear(kind, &name);
                    self.owners.remove(&(kind, name.to_string()));
                    self.metrics
                        .objects_written
                        .with_label_values(&[kind.as_str(), "delete"])
                        .inc();
                }
                Err(e) => {
                    ok = false;
                    warn!(kind = kind.as_str(), name = %name, error = %e, "deleting failed; will retry");
                    self.metrics.errors.with_label_values(&["delete"]).inc();
                    self.index.retry(kind, &name);
                }
            }
        }
        ok
    }
}
