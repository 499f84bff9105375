//! What every controller task shares: the client, the Event recorder, the
//! metrics, health flags, and the network config in force.

use canal_crds::NetworkConfig;
use canal_runtime::Health;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// The one field manager of the network controller (Node podCIDR and
/// annotations, CanalNetwork status).
pub const FIELD_MANAGER: &str = "canal-controller";

/// Tunables of the controllers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Node writes in flight at once.
    pub max_concurrent_writes: usize,
}

/// Shared by every task of canal-controller.
pub struct Context {
    /// API client.
    pub client: Client,
    /// The registry `/metrics` serves; leader tasks register into it for the
    /// term they run.
    pub registry: prometheus::Registry,
    /// Publishes Events as `canal-controller` / this replica.
    pub recorder: Recorder,
    /// All metrics.
    pub metrics: Metrics,
    /// Liveness and readiness.
    pub health: Health,
    /// Tunables.
    pub settings: Settings,
    network: watch::Sender<Option<NetworkConfig>>,
}

impl Context {
    /// Builds the context; `identity` names this replica in Events.
    pub fn new(
        client: Client,
        registry: prometheus::Registry,
        metrics: Metrics,
        health: Health,
        settings: Settings,
        identity: &str,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        );
        let (network, _) = watch::channel(None);
        Context {
            client,
            registry,
            recorder,
            metrics,
            health,
            settings,
            network,
        }
    }

    /// The CanalNetwork `default` config in force (None until the leader has
    /// read a valid one). Other leader tasks (the policy compiler) watch it.
    pub fn network_config(&self) -> watch::Receiver<Option<NetworkConfig>> {
        self.network.subscribe()
    }

    /// Publishes the config in force when it changed.
    pub(crate) fn publish_network_config(&self, config: Option<&NetworkConfig>) {
        self.network.send_if_modified(|current| {
            if current.as_ref() == config {
                false
            } else {
                *current = config.cloned();
                true
            }
        });
    }
}
