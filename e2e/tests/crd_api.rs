//! The canal.dev API against a real kube-apiserver: the CRDs install and
//! become Established, defaults are filled in, every invalid case is refused
//! with a message naming the field, and `kubectl explain` is useful.

use canal_crds::{CanalNetwork, EndpointToHostAction};
use canal_e2e::{ControlPlane, install};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::json;

async fn control_plane_with_crds() -> ControlPlane {
    let cp = ControlPlane::start().await.expect("control plane starts");
    install::install_crds(&cp.client())
        .await
        .expect("CRDs install");
    cp
}

fn network(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "canal.dev/v1alpha1",
        "kind": "CanalNetwork",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
async fn crds_install_and_defaults_are_filled_in() {
    let cp = control_plane_with_crds().await;
    let ar = ApiResource::erase::<CanalNetwork>(&());
    let dynamic: Api<DynamicObject> = Api::all_with(cp.client(), &ar);
    dynamic
        .create(
            &PostParams::default(),
            &network("default", json!({"clusterCIDR": "10.244.0.0/16"})),
        )
        .await
        .expect("a minimal CanalNetwork is accepted");

    let typed: Api<CanalNetwork> = Api::all(cp.client());
    let got = typed.get("default").await.unwrap();
    assert_eq!(got.spec.cluster_cidr, "10.244.0.0/16");
    assert_eq!(got.spec.node_subnet_length, 24);
    assert_eq!(got.spec.backend.vni, 1);
    assert_eq!(got.spec.backend.port, 8472);
    assert_eq!(got.spec.backend.mtu, 0);
    assert!(got.spec.masquerade);
    assert!(got.spec.policy.enabled);
    assert_eq!(
        got.spec.default_endpoint_to_host_action,
        EndpointToHostAction::Accept
    );

    for plural in ["canalnetworks", "nodepolicysets", "peersets"] {
        let out = cp
            .kubectl()
            .unwrap()
            .args(["get", "crd", &format!("{plural}.canal.dev")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn invalid_specs_are_rejected_naming_the_field() {
    let cp = control_plane_with_crds().await;
    let ar = ApiResource::erase::<CanalNetwork>(&());
    let api: Api<DynamicObject> = Api::all_with(cp.client(), &ar);

    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "not-a-cidr",
            json!({"clusterCIDR": "10.244.0.0"}),
            "clusterCIDR",
        ),
        (
            "garbage-cidr",
            json!({"clusterCIDR": "ten.dot.zero/8"}),
            "clusterCIDR",
        ),
        (
            "ipv6-cidr-subnet-not-longer",
            json!({"clusterCIDR": "fd00::/64"}),
            "nodeSubnetLengthV6",
        ),
        (
            "host-bits",
            json!({"clusterCIDR": "10.244.1.0/16"}),
            "clusterCIDR",
        ),
        (
            "subnet-not-longer",
            json!({"clusterCIDR": "10.244.0.0/16", "nodeSubnetLength": 16}),
            "nodeSubnetLength",
        ),
        (
            "subnet-shorter",
            json!({"clusterCIDR": "10.244.0.0/16", "nodeSubnetLength": 8}),
            "nodeSubnetLength",
        ),
        (
            "subnet-too-long",
            json!({"clusterCIDR": "10.244.0.0/16", "nodeSubnetLength": 31}),
            "nodeSubnetLength",
        ),
        (
            "vni-zero",
            json!({"clusterCIDR": "10.244.0.0/16", "backend": {"vni": 0}}),
            "backend.vni",
        ),
        (
            "vni-too-big",
            json!({"clusterCIDR": "10.244.0.0/16", "backend": {"vni": 16777216}}),
            "backend.vni",
        ),
        (
            "port-zero",
            json!({"clusterCIDR": "10.244.0.0/16", "backend": {"port": 0}}),
            "backend.port",
        ),
        (
            "port-too-big",
            json!({"clusterCIDR": "10.244.0.0/16", "backend": {"port": 65536}}),
            "backend.port",
        ),
        (
            "mtu-tiny",
            json!({"clusterCIDR": "10.244.0.0/16", "backend": {"mtu": 100}}),
            "backend.mtu",
        ),
        (
            "backend-type",
            json!({"clusterCIDR": "10.244.0.0/16", "backend": {"type": "udp"}}),
            "backend.type",
        ),
        (
            "host-action",
            json!({"clusterCIDR": "10.244.0.0/16", "defaultEndpointToHostAction": "Reject"}),
            "defaultEndpointToHostAction",
        ),
        // What can never work (issue 10.6): the message names the range.
        (
            "loopback",
            json!({"clusterCIDR": "127.0.0.0/8"}),
            "clusterCIDR must not overlap 127.0.0.0/8 (loopback)",
        ),
        (
            "inside-loopback",
            json!({"clusterCIDR": "127.10.0.0/16"}),
            "127.0.0.0/8 (loopback)",
        ),
        (
            "multicast",
            json!({"clusterCIDR": "224.0.0.0/4", "nodeSubnetLength": 30}),
            "224.0.0.0/4 (multicast)",
        ),
        (
            "reserved",
            json!({"clusterCIDR": "240.0.0.0/8"}),
            "240.0.0.0/4 (reserved",
        ),
        (
            "broadcast",
            json!({"clusterCIDR": "255.255.255.0/24", "nodeSubnetLength": 28}),
            "255.255.255.255",
        ),
        (
            "this-network",
            json!({"clusterCIDR": "0.0.0.0/8"}),
            "0.0.0.0/8",
        ),
        (
            "link-local",
            json!({"clusterCIDR": "169.254.0.0/16"}),
            "169.254.1.1",
        ),
        (
            "around-link-local",
            json!({"clusterCIDR": "169.0.0.0/8"}),
            "169.254.0.0/16 (link-local)",
        ),
        (
            "half-the-internet",
            json!({"clusterCIDR": "0.0.0.0/1"}),
            "clusterCIDR must not overlap 0.0.0.0/8",
        ),
        (
            "too-wide",
            json!({"clusterCIDR": "10.0.0.0/7"}),
            "clusterCIDR must be /8 or longer",
        ),
        (
            "interface-space-slash",
            json!({"clusterCIDR": "10.244.0.0/16", "interface": "a b/c"}),
            "interface must be a Linux interface name",
        ),
        (
            "interface-dot",
            json!({"clusterCIDR": "10.244.0.0/16", "interface": ".."}),
            "interface must be a Linux interface name",
        ),
        (
            "interface-alias",
            json!({"clusterCIDR": "10.244.0.0/16", "interface": "eth0:1"}),
            "interface must be a Linux interface name",
        ),
        (
            "interface-tab",
            json!({"clusterCIDR": "10.244.0.0/16", "interface": "eth\t0"}),
            "interface must be a Linux interface name",
        ),
        (
            "interface-16-bytes",
            json!({"clusterCIDR": "10.244.0.0/16", "interface": "äbcdefghijklmno"}),
            "interface must be a Linux interface name",
        ),
    ];

    let mut failures = vec![];
    for (name, spec, field) in cases {
        match api
            .create(&PostParams::default(), &network(name, spec.clone()))
            .await
        {
            Ok(_) => failures.push(format!("{name}: {spec} was accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(field) {
                    failures.push(format!(
                        "{name}: expected 422 naming {field}, got {}: {}",
                        status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{name}: unexpected error {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "validation gaps:\n{}",
        failures.join("\n")
    );

    // The boundaries themselves are valid.
    let ok = network(
        "edges",
        json!({"clusterCIDR": "10.0.0.0/8", "nodeSubnetLength": 30,
               "backend": {"vni": 16777215, "port": 65535, "mtu": 576}}),
    );
    api.create(&PostParams::default(), &ok)
        .await
        .expect("edge values are valid");
    for (name, spec) in [
        (
            "next-to-link-local",
            json!({"clusterCIDR": "169.253.0.0/16", "interface": "bond0.100"}),
        ),
        (
            "cgnat",
            json!({"clusterCIDR": "100.64.0.0/10", "interface": "fifteen-bytes-x"}),
        ),
        (
            "public",
            json!({"clusterCIDR": "223.0.0.0/8", "interface": ""}),
        ),
    ] {
        api.create(&PostParams::default(), &network(name, spec.clone()))
            .await
            .unwrap_or_else(|e| panic!("{name}: {spec} refused: {e}"));
    }
}

#[tokio::test]
async fn kubectl_explain_shows_field_descriptions() {
    let cp = control_plane_with_crds().await;
    // The OpenAPI document of a new CRD is published asynchronously.
    let mut last = String::new();
    for _ in 0..100 {
        let out = cp
            .kubectl()
            .unwrap()
            .args(["explain", "canalnetwork.spec"])
            .output()
            .unwrap();
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && last.contains("nodeSubnetLength") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for needle in [
        "clusterCIDR",
        "The range every pod address comes from",
        "clusterCIDRs",
        "nodeSubnetLengthV6",
        "nodeSubnetLength",
        "defaultEndpointToHostAction",
        "backend",
    ] {
        assert!(
            last.contains(needle),
            "kubectl explain lacks {needle:?}:\n{last}"
        );
    }
}

/// clusterCIDRs (issue 14) at the real API server: one range per family,
/// primary first, each checked against its family's table, the subnet
/// length of each family against its range, clusterCIDR agreeing with
/// the first entry.
#[tokio::test]
async fn cluster_cidrs_are_validated_per_family() {
    let cp = control_plane_with_crds().await;
    let ar = ApiResource::erase::<CanalNetwork>(&());
    let api: Api<DynamicObject> = Api::all_with(cp.client(), &ar);
    let v4 = "10.244.0.0/16";
    let v6 = "fd00:10:244::/56";
    let refused: Vec<(&str, serde_json::Value, &str)> = vec![
        ("no-range", json!({}), "set clusterCIDR or clusterCIDRs"),
        (
            "empty-list",
            json!({"clusterCIDRs": []}),
            "set clusterCIDR or clusterCIDRs",
        ),
        (
            "two-v4",
            json!({"clusterCIDRs": [v4, "10.245.0.0/16"]}),
            "at most one IPv4 and one IPv6",
        ),
        (
            "two-v6",
            json!({"clusterCIDRs": [v6, "fd01::/56"]}),
            "at most one IPv4 and one IPv6",
        ),
        (
            "three",
            json!({"clusterCIDRs": [v4, v6, "10.1.0.0/16"]}),
            "clusterCIDRs",
        ),
        (
            "not-cidr",
            json!({"clusterCIDRs": [v4, "fd00::"]}),
            "every clusterCIDRs entry must be a valid network",
        ),
        (
            "host-bits-v6",
            json!({"clusterCIDRs": ["fd00::1/56"]}),
            "no host bits",
        ),
        (
            "link-local-v6",
            json!({"clusterCIDRs": [v4, "fe80::/56"]}),
            "clusterCIDRs must not overlap fe80::/10 (link-local)",
        ),
        (
            "multicast-v6",
            json!({"clusterCIDRs": ["ff05::/56"]}),
            "ff00::/8 (multicast)",
        ),
        (
            "loopback-v6",
            json!({"clusterCIDRs": [v4, "::1/128"]}),
            "::1/128 (loopback)",
        ),
        (
            "loopback-v4-in-list",
            json!({"clusterCIDRs": ["127.0.0.0/16", v6]}),
            "127.0.0.0/8 (loopback)",
        ),
        (
            "too-wide-v6",
            json!({"clusterCIDRs": ["fd00::/24"]}),
            "must be /32 or longer",
        ),
        (
            "too-wide-v6-single",
            json!({"clusterCIDR": "fd00::/24"}),
            "must be /32 or longer",
        ),
        (
            "reserved-v6-single",
            json!({"clusterCIDR": "fe80::/64"}),
            "fe80::/10 (link-local)",
        ),
        (
            "v6-len-not-longer",
            json!({"clusterCIDRs": [v4, v6], "nodeSubnetLengthV6": 56}),
            "nodeSubnetLengthV6",
        ),
        (
            "v6-len-too-many",
            json!({"clusterCIDRs": ["fd00::/48"], "nodeSubnetLengthV6": 96}),
            "at most 32 bits longer",
        ),
        (
            "v6-len-127",
            json!({"clusterCIDRs": [v6], "nodeSubnetLengthV6": 127}),
            "nodeSubnetLengthV6",
        ),
        (
            "v4-len-in-list",
            json!({"clusterCIDRs": [v6, v4], "nodeSubnetLength": 16}),
            "nodeSubnetLength",
        ),
        (
            "disagree",
            json!({"clusterCIDR": "10.99.0.0/16", "clusterCIDRs": [v4, v6]}),
            "clusterCIDR must equal the first entry",
        ),
        (
            "disagree-family",
            json!({"clusterCIDR": v4, "clusterCIDRs": [v6, v4]}),
            "clusterCIDR must equal the first entry",
        ),
    ];
    let mut failures = vec![];
    for (name, spec, needle) in refused {
        match api
            .create(&PostParams::default(), &network(name, spec.clone()))
            .await
        {
            Ok(_) => failures.push(format!("{name}: {spec} was accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(needle) {
                    failures.push(format!(
                        "{name}: expected 422 with {needle:?}, got {}: {}",
                        status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{name}: unexpected error {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "validation gaps:\n{}",
        failures.join("\n")
    );

    // What must be accepted: every shape the controller supports.
    for (name, spec) in [
        ("dual", json!({"clusterCIDRs": [v4, v6]})),
        ("dual-v6-first", json!({"clusterCIDRs": [v6, v4]})),
        ("v6-only", json!({"clusterCIDRs": [v6]})),
        ("v6-single", json!({"clusterCIDR": v6})),
        (
            "both-agree",
            json!({"clusterCIDR": v4, "clusterCIDRs": [v4, v6]}),
        ),
        (
            "both-agree-spelling",
            json!({"clusterCIDR": "fd00:10:244::/56", "clusterCIDRs": ["fd00:10:244:0::/56", v4]}),
        ),
        (
            "v6-edges",
            json!({"clusterCIDRs": ["2001:db8::/32"], "nodeSubnetLengthV6": 64}),
        ),
        (
            "v6-len-126",
            json!({"clusterCIDRs": ["fd00:1::/112"], "nodeSubnetLengthV6": 126}),
        ),
    ] {
        api.create(&PostParams::default(), &network(name, spec.clone()))
            .await
            .unwrap_or_else(|e| panic!("{name}: {spec} refused: {e}"));
    }
    // The default IPv6 subnet length is 64.
    let got = api.get("dual").await.unwrap();
    assert_eq!(got.data["spec"]["nodeSubnetLengthV6"], 64, "{:?}", got.data);
}
