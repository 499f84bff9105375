//! `canal-lab status`.

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::control_plane;
use crate::lab::{Context, kernel, names, netns, nodes};
use crate::{Error, process};

/// A readable summary of the lab.
pub async fn status(ctx: &Context) -> Result<(String, bool), Error> {
    let mut out = String::new();
    let mut healthy = true;
    let mut line = |ok: bool, text: String| {
        healthy &= ok;
        out.push_str(&format!("{} {text}\n", if ok { " ok " } else { "FAIL" }));
    };
    let cp_up = process::live_pid(
        &control_plane::Layout {
            dir: ctx.state.control_plane(),
        }
        .pid_file("kube-apiserver"),
        "kube-apiserver",
    )
    .is_some();
    line(cp_up, format!("kube-apiserver {}", ctx.lab.server));
    let family = ctx.lab.ip_family;
    let mut underlays = Vec::new();
    if family.has_v4() {
        underlays.push(format!(
            "underlay {} (gateway {}), internet host {}",
            ctx.lab.underlay,
            ctx.names.gateway(),
            names::INTERNET_HOST
        ));
    }
    if let Some(u6) = ctx.lab.underlay6 {
        underlays.push(format!(
            "underlay {u6} (gateway {}), internet host {}",
            ctx.names.gateway6(),
            names::INTERNET_HOST6
        ));
    }
    line(
        true,
        format!(
            "prefix {}, {family}: {}",
            ctx.lab.prefix,
            underlays.join("; ")
        ),
    );
    if ctx.lab.controller {
        let alive =
            process::live_pid(&ctx.state.pid_file("controller"), "canal-controller").is_some();
        line(
            alive,
            format!(
                "canal-controller (metrics {})",
                ctx.lab
                    .controller_metrics
                    .map(|m| m.to_string())
                    .unwrap_or_default()
            ),
        );
    }
    let alive = process::live_pid(&ctx.state.pid_file("forwarder"), "canal-lab").is_some();
    line(
        alive,
        format!(
            "API forwarder (https://127.0.0.1:{} in every node namespace)",
            names::NODE_API_PORT
        ),
    );
    if ctx.lab.controller && ctx.lab.agents {
        // What canal-controller summarises from the agents' NodePolicySet statuses.
        let network = Api::<canal_crds::CanalNetwork>::all(ctx.client.clone())
            .get_opt(canal_crds::DEFAULT_NETWORK_NAME)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.status);
        let (summary, ok) = match network.as_ref().and_then(|s| {
            Some((
                s.policy_enforcement.clone()?,
                s.policy_enforced_nodes?,
                s.policy_nodes?,
            ))
        }) {
            Some((text, enforced, nodes)) => {
                let ok = enforced == nodes || text == "disabled";
                (text, ok)
            }
            None => ("not reported yet".to_string(), false),
        };
        line(ok, format!("NetworkPolicy enforced: {summary}"));
    }
    let api: Api<Node> = Api::all(ctx.client.clone());
    for node in ctx.state.nodes()? {
        let cidrs: Vec<String> = api
            .get_opt(&node.name)
            .await
            .ok()
            .flatten()
            .map(|n| kernel::pod_cidrs(&n))
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect();
        let cidr = if cidrs.is_empty() {
            "no podCIDR".to_string()
        } else {
            cidrs.join(",")
        };
        let addresses: Vec<String> = node.addresses().iter().map(ToString::to_string).collect();
        let mut ok = netns::exists(&node.netns);
        let mut text = format!(
            "node {} {} {} netns {}",
            node.name,
            addresses.join(","),
            cidr,
            node.netns
        );
        if ctx.lab.agents {
            let ready = nodes::http_get(Some(&node.netns), names::AGENT_METRICS_PORT, "/readyz")
                .map(|r| kernel::http_ok(&r))
                .unwrap_or(false);
            ok &= ready;
            text.push_str(if ready {
                ", agent ready"
            } else {
                ", agent NOT ready"
            });
        }
        line(ok, text);
    }
    for pod in ctx.state.pods()? {
        let alive = process::live_pid(
            &ctx.state.pod(&pod.namespace, &pod.name).echo().pid(),
            "canal-lab",
        )
        .is_some();
        let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
        let ports: Vec<String> = pod.ports.iter().map(ToString::to_string).collect();
        line(
            alive,
            format!(
                "pod {} on {} ip {} ports {}",
                pod.key(),
                pod.node,
                ips.join(","),
                ports.join(" ")
            ),
        );
    }
    Ok((out, healthy))
}
