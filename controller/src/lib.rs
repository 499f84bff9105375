//! canal-controller: one active replica reconciles the cluster-wide network
//! state (CanalNetwork, Node pod CIDRs and VTEP annotations, NodePolicySets
//! and PeerSets).
//!
//! Pure modules (no kube I/O): [`ipam`] (the subnet allocator), [`vtep`]
//! (what is written on a Node), [`status`] (CanalNetwork status),
//! [`network::state`] (the controller's decisions), [`node_view`].
//! I/O shells: [`network`] (watches and writes), [`leader`] (the Lease).
//! [`policy`]: the NetworkPolicy compiler (pure core) and its controller.

pub mod cli;
pub mod context;
pub mod ipam;
pub mod leader;
pub mod metrics;
pub mod network;
pub mod node_view;
pub mod policy;
pub mod status;
pub mod vtep;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, TryFutureExt};
use tokio::sync::oneshot;

use crate::context::{Context, Settings};
use crate::leader::{Elector, HoldEnd, LeaseConfig};

/// A failure that stops the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server is not usable.
    #[error(transparent)]
    Connect(#[from] canal_runtime::kube_client::Error),
    /// The metrics/health endpoint failed.
    #[error(transparent)]
    Http(#[from] canal_runtime::http::Error),
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] metrics::RegisterError),
    /// The leader election flags are inconsistent.
    #[error("invalid leader election flags: {0}")]
    LeaseConfig(#[from] leader::ConfigError),
    /// The network controller stopped.
    #[error("network controller: {0}")]
    Network(#[from] network::Error),
    /// The task renewing the Lease died.
    #[error("the Lease renewal task failed: {0}")]
    Election(String),
    /// The NetworkPolicy controller stopped.
    #[error("NetworkPolicy controller: {0}")]
    Policy(#[from] policy::Error),
}

/// A task that runs only on the leader, forever.
pub type LeaderTask = BoxFuture<'static, Result<(), Error>>;

/// Every leader-only task: the network controller (CanalNetwork, Node
/// subnets and annotations) and the NetworkPolicy controller. They start when
/// this replica becomes the leader and are all dropped, with every write they
/// have in flight, the moment it stops being one.
fn leader_tasks(ctx: &Arc<Context>) -> Vec<LeaderTask> {
    let client = ctx.client.clone();
    let registry = ctx.registry.clone();
    vec![
        network::run(ctx.clone()).err_into().boxed(),
        async move { policy::run(client, &registry, policy::Options::default()).await }
            .err_into()
            .boxed(),
    ]
}

/// Runs the leader tasks until the first one ends (they run forever).
async fn run_leader_tasks(ctx: &Arc<Context>) -> Result<(), Error> {
    let (result, _, _) = futures::future::select_all(leader_tasks(ctx)).await;
    result
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: cli::Args) -> Result<(), Error> {
    let lease = args.lease();
    if args.leader_elect {
        lease.validate()?;
    }
    let client =
        canal_runtime::kube_client::connect(args.kubeconfig.as_deref(), Duration::from_secs(15))
            .await?;
    let registry =
        canal_runtime::metrics::registry("controller").map_err(metrics::RegisterError::from)?;
    let metrics = metrics::Metrics::register(&registry)?;
    let health = canal_runtime::Health::new();
    let (addr, server) =
        canal_runtime::http::bind(args.metrics_addr, registry.clone(), health.clone()).await?;
    tracing::info!(%addr, identity = %lease.identity, leader_elect = args.leader_elect, "serving /metrics, /healthz and /readyz");
    let ctx = Arc::new(Context::new(
        client,
        registry,
        metrics,
        health.clone(),
        Settings {
            max_concurrent_writes: args.max_concurrent_writes.max(1),
        },
        &lease.identity,
    ));
    // Ready means up and connected: a standby must count as ready too, or a
    // rolling update of the Deployment would never finish.
    health.set_ready(true);
    let lead = lead(
        ctx,
        args.leader_elect.then_some(lease),
        shutdown_signal().boxed(),
    );
    tokio::select! {
        r = server => r?,
        r = lead => r?,
    }
    tracing::info!("stopped");
    Ok(())
}

/// Waits for the Lease (unless election is off), runs the leader tasks while
/// holding it, and goes back to waiting when it is lost.
async fn lead(
    ctx: Arc<Context>,
    lease: Option<LeaseConfig>,
    mut shutdown: BoxFuture<'static, ()>,
) -> Result<(), Error> {
    let m = ctx.metrics.clone();
    let Some(lease) = lease else {
        m.leader.set(1);
        m.leader_transitions.inc();
        return tokio::select! {
            r = run_leader_tasks(&ctx) => r,
            _ = &mut shutdown => Ok(()),
        };
    };
    let mut elector = Elector::new(ctx.client.clone(), lease);
    loop {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = &mut shutdown => return Ok(()),
        }
        tracing::info!(identity = %elector.config().identity, "became the leader");
        m.leader.set(1);
        m.leader_transitions.inc();
        let (stop, stopped) = oneshot::channel();
        // Renewals run on their own task so a busy leader never starves them.
        let mut holder = tokio::spawn(async move {
            let end = elector.hold(stopped).await;
            (elector, end)
        });
        let outcome = tokio::select! {
            held = &mut holder => Some(held),
            r = run_leader_tasks(&ctx) => {
                // Unreachable in practice: leader tasks run forever.
                tracing::error!("a leader task ended: {r:?}");
                None
            }
            _ = &mut shutdown => None,
        };
        // The leader tasks' future is dropped here: nothing writes any more.
        m.leader.set(0);
        match outcome {
            Some(Ok((e, end))) => {
                match &end {
                    HoldEnd::Taken(holder) => {
                        tracing::warn!(%holder, "lost the Lease to another replica; stopped writing")
                    }
                    HoldEnd::DeadlineExceeded => tracing::warn!(
                        "could not renew the Lease in time; stopped writing and stepped down"
                    ),
                    HoldEnd::Stopped => {}
                }
                elector = e;
            }
            Some(Err(join)) => return Err(Error::Election(join.to_string())),
            None => {
                let _ = stop.send(());
                // Releases the Lease so a standby takes over at once.
                let _ = holder.await;
                return Ok(());
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}
