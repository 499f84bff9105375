//! One read of everything an explanation or a status table uses.

use std::collections::BTreeMap;

use canal_crds::{
    CanalNetwork, DEFAULT_NETWORK_NAME, NodePolicySet, PeerSet, PeerSetObjectSpec, PolicyGroup,
    PolicyGroupSpec,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};

use crate::Error;

/// The objects, by name (pods by `namespace/name`).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// NodePolicySets by name (= node name).
    pub node_policy_sets: BTreeMap<String, NodePolicySet>,
    /// PolicyGroups (heads and slices) by name.
    pub groups: BTreeMap<String, PolicyGroupSpec>,
    /// PeerSets (heads and slices) by name.
    pub peer_sets: BTreeMap<String, PeerSetObjectSpec>,
    /// CanalNetwork `default`.
    pub network: Option<CanalNetwork>,
}

impl Snapshot {
    /// Lists every object kind once.
    pub async fn fetch(client: &kube::Client) -> Result<Snapshot, Error> {
        let lp = ListParams::default();
        let api_err = |what: &str| {
            let what = what.to_string();
            move |source| Error::Api { what, source }
        };
        let pods = Api::<Pod>::all(client.clone())
            .list(&lp)
            .await
            .map_err(api_err("Pods"))?;
        let nodes = Api::<Node>::all(client.clone())
            .list(&lp)
            .await
            .map_err(api_err("Nodes"))?;
        let npss = Api::<NodePolicySet>::all(client.clone())
            .list(&lp)
            .await
            .map_err(api_err("NodePolicySets"))?;
        let groups = Api::<PolicyGroup>::all(client.clone())
            .list(&lp)
            .await
            .map_err(api_err("PolicyGroups"))?;
        let sets = Api::<PeerSet>::all(client.clone())
            .list(&lp)
            .await
            .map_err(api_err("PeerSets"))?;
        let network = Api::<CanalNetwork>::all(client.clone())
            .get_opt(DEFAULT_NETWORK_NAME)
            .await
            .map_err(api_err("CanalNetwork default"))?;
        let name = |m: &kube::api::ObjectMeta| m.name.clone().unwrap_or_default();
        Ok(Snapshot {
            pods: pods
                .items
                .into_iter()
                .map(|p| {
                    let key = format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        name(&p.metadata)
                    );
                    (key, p)
                })
                .collect(),
            nodes: nodes
                .items
                .into_iter()
                .map(|n| (name(&n.metadata), n))
                .collect(),
            node_policy_sets: npss
                .items
                .into_iter()
                .map(|n| (name(&n.metadata), n))
                .collect(),
            groups: groups
                .items
                .into_iter()
                .map(|g| (name(&g.metadata), g.spec))
                .collect(),
            peer_sets: sets
                .items
                .into_iter()
                .map(|s| (name(&s.metadata), s.spec))
                .collect(),
            network,
        })
    }
}
