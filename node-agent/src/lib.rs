//! canal-agent (one per node: the VXLAN overlay, masquerade and NetworkPolicy
//! enforcement in the node's kernel) and canal-cni (wires each pod).
//!
//! Pure modules (no kube, no netlink): [`overlay::desired`], [`overlay::diff`],
//! [`overlay::snapshot`], [`masq::render`], [`nodes`], [`report`], the decision parts of
//! [`cni`]. Shells: [`overlay::netlink`], [`masq`], [`agent`], [`cni`]'s
//! dataplane.

pub mod agent;
pub mod cli;
pub mod cni;
pub mod component;
pub mod masq;
pub mod metrics;
pub mod netns;
pub mod nodes;
pub mod overlay;
pub mod policy;
pub mod report;
pub mod runfiles;

use std::time::Duration;

use component::{ComponentContext, NodeComponent};

/// A failure that stops the agent.
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
    Metrics(#[from] metrics::MetricsError),
    /// No netlink socket.
    #[error(transparent)]
    Netlink(#[from] netns::NetnsError),
    /// A component stopped with an error.
    #[error("component {name} failed: {source}")]
    Component {
        name: &'static str,
        #[source]
        source: component::ComponentError,
    },
}

/// Runs the agent (connectivity and NetworkPolicy enforcement) until
/// SIGTERM/SIGINT.
pub async fn run(args: cli::Args) -> Result<(), Error> {
    let policy = policy::component::PolicyComponent::new(policy::component::Options {
        drift_interval: args.policy_resync_interval,
        ..policy::component::Options::default()
    });
    run_with(args, vec![Box::new(policy)]).await
}

/// Runs the agent with extra node-side components (see [`component`]).
pub async fn run_with(
    args: cli::Args,
    components: Vec<Box<dyn NodeComponent>>,
) -> Result<(), Error> {
    let client =
        canal_runtime::kube_client::connect(args.kubeconfig.as_deref(), Duration::from_secs(15))
            .await?;
    let registry =
        canal_runtime::metrics::registry("agent").map_err(metrics::MetricsError::from)?;
    let metrics = metrics::Metrics::register(&registry)?;
    let health = canal_runtime::Health::new();
    let (addr, server) =
        canal_runtime::http::bind(args.metrics_addr, registry.clone(), health.clone()).await?;
    tracing::info!(%addr, node = %args.node_name, "serving /metrics, /healthz and /readyz");

    let (network_tx, network_rx) = tokio::sync::watch::channel(None);
    let agent = agent::Agent::new(agent::AgentParts {
        node_name: args.node_name.clone(),
        run_dir: runfiles::RunDir::new(&args.run_dir),
        client: client.clone(),
        metrics,
        health: health.clone(),
        netlink: overlay::netlink::Netlink::new(netns::handle_here()?),
        masq: masq::Masquerade::new(masq::Iptables::new()),
        resync: args.resync_interval,
        set_network_unavailable: args.set_network_unavailable,
        network_tx,
    });

    let mut tasks = tokio::task::JoinSet::new();
    for component in components {
        let name = component.name();
        let ctx = ComponentContext {
            client: client.clone(),
            node_name: args.node_name.clone(),
            run_dir: args.run_dir.clone(),
            registry: registry.clone(),
            network: network_rx.clone(),
            readiness: health.gate(name),
        };
        tracing::info!(component = name, "starting");
        tasks.spawn(async move { (name, component.run(ctx).await) });
    }
    let component_failure = async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((name, Err(source))) => return Error::Component { name, source },
                Ok((name, Ok(()))) => tracing::warn!(component = name, "component stopped"),
                Err(e) => tracing::error!("a component panicked: {e}"),
            }
        }
        std::future::pending().await
    };
    tokio::select! {
        r = server => r?,
        () = agent.run() => {}
        e = component_failure => return Err(e),
        _ = shutdown_signal() => tracing::info!("shutting down; kernel state is left in place"),
    }
    Ok(())
}

/// SIGTERM (what the kubelet sends) or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
