//! Installing canal's API into a cluster: the CRDs (waiting until they are
//! Established) and a CanalNetwork.

use std::time::{Duration, Instant};

use canal_crds::{CanalNetwork, CanalNetworkSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use crate::Error;

/// Field manager for what the lab and tests apply.
pub const FIELD_MANAGER: &str = "canal-lab";

/// Server-side applies every CRD and waits until each is Established.
pub async fn install_crds(client: &Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let crds = canal_crds::crd::all();
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(crd))
            .await
            .map_err(|e| Error::Kube(format!("applying CRD {name}"), e))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let current = api
                .get(&name)
                .await
                .map_err(|e| Error::Kube(format!("reading CRD {name}"), e))?;
            let established = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!("CRD {name} to become Established")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Server-side applies the CanalNetwork `default` with `spec`.
pub async fn apply_default_network(
    client: &Client,
    spec: CanalNetworkSpec,
) -> Result<CanalNetwork, Error> {
    let api: Api<CanalNetwork> = Api::all(client.clone());
    let obj = CanalNetwork::new(canal_crds::DEFAULT_NETWORK_NAME, spec);
    api.patch(
        canal_crds::DEFAULT_NETWORK_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map_err(|e| Error::Kube("applying CanalNetwork default".into(), e))
}
