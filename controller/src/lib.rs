//! canal-controller: one active replica reconciles the cluster-wide network
//! state (CanalNetwork, Node pod CIDRs and VTEP annotations, NodePolicySets
//! and PeerSets).

pub mod cli;
pub mod policy;

use std::time::Duration;

/// A failure that stops the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server is not usable.
    #[error(transparent)]
    Connect(#[from] canal_runtime::kube_client::Error),
    /// The metrics/health endpoint failed.
    #[error(transparent)]
    Http(#[from] canal_runtime::http::Error),
    /// The NetworkPolicy controller stopped.
    #[error(transparent)]
    Policy(#[from] policy::Error),
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: cli::Args) -> Result<(), Error> {
    let client =
        canal_runtime::kube_client::connect(args.kubeconfig.as_deref(), Duration::from_secs(15))
            .await?;
    let registry = prometheus::Registry::new();
    let health = canal_runtime::Health::new();
    let (addr, server) =
        canal_runtime::http::bind(args.metrics_addr, registry.clone(), health.clone()).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    health.set_ready(true);
    tokio::select! {
        r = server => r?,
        r = policy::run(client, &registry, policy::Options::default()) => r?,
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    Ok(())
}
