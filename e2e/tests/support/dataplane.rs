//! Running the lab's policy tests on either dataplane: `spec.policy.dataplane`
//! of the CanalNetwork set with a merge patch (what `kubectl edit` does),
//! then waiting until every agent reports it in its NodePolicySet status and
//! every node's kernel shows canal's state in that dataplane only.

use std::time::Duration;

use canal_e2e::Lab;
use canal_e2e::lab::netns;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::eventually;

/// A dataplane as the API spells it and as agents report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// iptables + ipset.
    IpTables,
    /// canal's nftables tables.
    NfTables,
}

impl Dataplane {
    /// The `spec.policy.dataplane` value.
    pub fn spec(self) -> &'static str {
        match self {
            Dataplane::IpTables => "IPTables",
            Dataplane::NfTables => "NFTables",
        }
    }

    /// The NodePolicySet `status.dataplane` value.
    pub fn status(self) -> &'static str {
        match self {
            Dataplane::IpTables => "iptables",
            Dataplane::NfTables => "nftables",
        }
    }
}

/// Whether canal's policy state is in each dataplane of a node namespace:
/// (iptables/ipset, nftables).
pub fn kernel_has(node_ns: &str) -> (bool, bool) {
    let ipt = netns::run(
        netns::exec(node_ns, "sh").args(["-c", "iptables-save; ip6tables-save; ipset list -n"]),
    )
    .unwrap_or_default();
    let nft = netns::run(netns::exec(node_ns, "nft").args(["list", "tables"])).unwrap_or_default();
    (
        ipt.contains("CANAL-") || ipt.contains("canal-"),
        nft.lines().any(|l| l.trim() == "table inet canal"),
    )
}

/// Sets `spec.policy.dataplane` and waits until every node runs it alone.
pub async fn use_dataplane(lab: &Lab, dataplane: Dataplane) {
    let api: Api<canal_crds::CanalNetwork> = Api::all(lab.client());
    api.patch(
        canal_crds::DEFAULT_NETWORK_NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"policy": {"dataplane": dataplane.spec()}}})),
    )
    .await
    .expect("patching spec.policy.dataplane");
    wait_dataplane(lab, dataplane, Duration::from_secs(30)).await;
}

/// Waits until every NodePolicySet reports `dataplane` and every node's
/// kernel holds canal's policy state in it and not in the other.
pub async fn wait_dataplane(lab: &Lab, dataplane: Dataplane, timeout: Duration) {
    let api: Api<canal_crds::NodePolicySet> = Api::all(lab.client());
    eventually("every agent reports the dataplane", timeout, || {
        let api = api.clone();
        async move {
            let list = api
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let wrong: Vec<String> = list
                .items
                .iter()
                .filter(|n| {
                    n.status.as_ref().and_then(|s| s.dataplane.as_deref())
                        != Some(dataplane.status())
                })
                .map(|n| format!("{:?}", n.metadata.name))
                .collect();
            if wrong.is_empty() && !list.items.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet on {}: {wrong:?}", dataplane.status()))
            }
        }
    })
    .await;
    for node in lab.nodes().expect("lab nodes") {
        let ns = node.netns.clone();
        eventually("the other dataplane is empty", timeout, || {
            let ns = ns.clone();
            async move {
                let (ipt, nft) = kernel_has(&ns);
                let ok = match dataplane {
                    Dataplane::IpTables => ipt && !nft,
                    Dataplane::NfTables => nft && !ipt,
                };
                if ok {
                    Ok(())
                } else {
                    Err(format!("iptables: {ipt}, nftables: {nft}"))
                }
            }
        })
        .await;
    }
}
