//! The Helm chart: lint, render with default and non-default values, refuse
//! bad values with clear messages, install/upgrade/uninstall against a real
//! kube-apiserver, and agree with the binaries on every flag it passes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use canal_crds::CanalNetwork;
use canal_e2e::ControlPlane;
use kube::api::Api;
use serde_json::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/canal")
}

fn custom_values() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chart-values-custom.yaml")
}

fn helm(args: &[&str]) -> Output {
    let helm = canal_e2e::helm::helm().expect("helm is available");
    Command::new(helm).args(args).output().expect("helm runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template` output as JSON documents.
fn render(extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "canal",
        chart.to_str().unwrap(),
        "--namespace",
        "kube-system",
        "--kube-version",
        "1.37.2",
    ];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template {extra:?} failed:\n{}",
        text(&out)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&yaml)
        .filter_map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn lint_passes_with_default_and_custom_values() {
    let chart = chart();
    let out = helm(&["lint", chart.to_str().unwrap(), "--strict"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = helm(&[
        "lint",
        chart.to_str().unwrap(),
        "--strict",
        "-f",
        custom_values().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn default_values_render_every_component() {
    let docs = render(&[]);
    let expected: BTreeSet<String> = [
        "CanalNetwork",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds(&docs), expected);

    let net = find(&docs, "CanalNetwork");
    assert_eq!(net["metadata"]["name"], "default");
    assert_eq!(net["spec"]["clusterCIDR"], "10.244.0.0/16");
    assert_eq!(net["spec"]["backend"]["vni"], 1);

    let ds = find(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"][0]["operator"], "Exists",
        "the agent must tolerate every taint"
    );
    let caps = &pod["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(caps["drop"][0], "ALL");
    assert_eq!(caps["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]));
    assert!(
        pod["containers"][0]["securityContext"]
            .get("privileged")
            .is_none()
    );
    let mounts: Vec<&str> = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for path in ["/run/xtables.lock", "/lib/modules", "/run/canal"] {
        assert!(
            mounts.contains(&path),
            "agent lacks mount {path}: {mounts:?}"
        );
    }
    assert_eq!(pod["initContainers"][0]["name"], "install-cni");

    let deploy = find(&docs, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert!(c["livenessProbe"]["httpGet"]["path"] == "/healthz");
    assert!(c["readinessProbe"]["httpGet"]["path"] == "/readyz");

    // Bootstrap: the controller needs no pod network (it makes it), so it
    // runs on the host network, schedules onto nodes that are not ready yet,
    // and rolls without a surge replica (which could not bind metricsPort).
    let cpod = &deploy["spec"]["template"]["spec"];
    assert_eq!(cpod["hostNetwork"], true);
    assert_eq!(cpod["dnsPolicy"], "ClusterFirstWithHostNet");
    let keys: Vec<&str> = cpod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["key"].as_str())
        .collect();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/network-unavailable",
        "CriticalAddonsOnly",
    ] {
        assert!(
            keys.contains(&key),
            "controller does not tolerate {key}: {keys:?}"
        );
    }
    assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"], 0);
    // Hosts without loadable modules have no /lib/modules.
    let lib_modules = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "lib-modules")
        .unwrap();
    assert_eq!(lib_modules["hostPath"]["type"], "DirectoryOrCreate");
    // Runtimes run `loopback` for every sandbox: installed where missing.
    let init_args = pod["initContainers"][0]["args"].as_array().unwrap();
    assert!(init_args.contains(&serde_json::json!("--extra-plugin=/usr/lib/cni/loopback")));
}

#[test]
fn custom_values_switch_every_optional_path() {
    let docs = render(&["-f", custom_values().to_str().unwrap()]);
    let k = kinds(&docs);
    assert!(
        k.contains("ServiceMonitor") && k.contains("PodMonitor"),
        "{k:?}"
    );
    assert!(
        !k.contains("Role"),
        "no lease Role without leader election: {k:?}"
    );
    assert!(!k.contains("Service"), "metrics Services disabled: {k:?}");

    let net = find(&docs, "CanalNetwork");
    assert_eq!(net["spec"]["backend"]["type"], "host-gw");
    assert_eq!(net["spec"]["backend"]["mtu"], 8950);
    assert_eq!(net["spec"]["interface"], "eth1");
    assert_eq!(net["spec"]["defaultEndpointToHostAction"], "Drop");
    assert_eq!(net["spec"]["policy"]["enabled"], false);

    let deploy = find(&docs, "Deployment");
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example.com/canal:1.2.3");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--leader-elect=false"), "{args:?}");
    assert!(args.contains(&"--metrics-addr=0.0.0.0:19090"), "{args:?}");
    // Off the host network: no surge restriction; user tolerations come on
    // top of the bootstrap ones, never instead of them.
    let cpod = &deploy["spec"]["template"]["spec"];
    assert!(cpod.get("hostNetwork").is_none(), "{cpod}");
    assert!(deploy["spec"].get("strategy").is_none());
    let keys: Vec<&str> = cpod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["key"].as_str())
        .collect();
    assert!(
        keys.contains(&"node.kubernetes.io/not-ready") && keys.contains(&"dedicated"),
        "{keys:?}"
    );

    let dashboard = find(&docs, "ConfigMap");
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(dashboard["metadata"]["labels"]["team"], "platform");
    let shipped: Value =
        serde_json::from_str(dashboard["data"]["canal.json"].as_str().unwrap()).unwrap();
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/canal.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shipped, file, "the ConfigMap carries dashboards/canal.json");

    let no_network = render(&["--set", "network.create=false"]);
    assert!(!kinds(&no_network).contains("CanalNetwork"));
}

#[test]
fn bad_values_fail_at_install_time_with_a_clear_message() {
    let chart = chart();
    let cases = [
        ("network.clusterCIDR=10.244.0.0", "/network/clusterCIDR"),
        ("network.nodeSubnetLength=31", "/network/nodeSubnetLength"),
        ("network.backend.type=udp", "/network/backend/type"),
        ("network.backend.vni=0", "/network/backend/vni"),
        ("network.backend.port=70000", "/network/backend/port"),
        ("network.backend.mtu=100", "/network/backend/mtu"),
        (
            "network.defaultEndpointToHostAction=Reject",
            "/network/defaultEndpointToHostAction",
        ),
        ("controller.logFormat=xml", "/controller/logFormat"),
        ("agent.cni.confName=canal.conf", "/agent/cni/confName"),
        ("netwrok.masquerade=false", "netwrok"),
        (
            "metrics.grafanaDashboard.enabled=yes",
            "/metrics/grafanaDashboard/enabled",
        ),
        (
            "metrics.grafanaDashboard.namespace=Monitoring",
            "/metrics/grafanaDashboard/namespace",
        ),
    ];
    let mut gaps = vec![];
    for (set, field) in cases {
        let out = helm(&[
            "template",
            "canal",
            chart.to_str().unwrap(),
            "--kube-version",
            "1.37.2",
            "--set",
            set,
        ]);
        let msg = text(&out);
        if out.status.success() || !msg.contains(field) {
            gaps.push(format!(
                "--set {set}: expected a failure naming {field}, got:\n{msg}"
            ));
        }
    }
    assert!(gaps.is_empty(), "{}", gaps.join("\n"));
}

/// Where cargo put the workspace's binaries (next to this test's deps dir).
fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// Every container the chart renders runs a real binary with flags it accepts:
/// the rendered command and args, followed by `--help`, must parse.
#[test]
fn chart_flags_agree_with_the_binaries() {
    let mut checked = 0;
    for values in [
        vec![],
        vec!["-f".to_string(), custom_values().display().to_string()],
    ] {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        for doc in render(&values) {
            let spec = &doc["spec"]["template"]["spec"];
            let containers = spec["containers"]
                .as_array()
                .into_iter()
                .chain(spec["initContainers"].as_array())
                .flatten();
            for c in containers {
                // A crash's last log lines reach `kubectl describe pod`.
                assert_eq!(
                    c["terminationMessagePolicy"], "FallbackToLogsOnError",
                    "{} {}",
                    doc["kind"], c["name"]
                );
                let command: Vec<&str> = c["command"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
                    .unwrap_or_default();
                let binary = Path::new(command[0]).file_name().unwrap().to_str().unwrap();
                let out = Command::new(workspace_binary(binary))
                    .args(&command[1..])
                    .args(&args)
                    .arg("--help")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{} {}: {binary} refuses the chart's flags {args:?}:\n{}",
                    doc["kind"],
                    c["name"],
                    text(&out)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "only {checked} containers checked");
}

#[tokio::test]
async fn install_upgrade_uninstall_against_a_real_api_server() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    let kubeconfig = cp.kubeconfig();
    let kc = kubeconfig.to_str().unwrap();
    let chart = chart();
    let chart = chart.to_str().unwrap();

    let out = helm(&[
        "install",
        "canal",
        chart,
        "--kubeconfig",
        kc,
        "--namespace",
        "kube-system",
        "--wait=false",
    ]);
    assert!(out.status.success(), "helm install failed:\n{}", text(&out));

    // Every object of the release exists (the API server validated each).
    let manifest = helm(&[
        "get",
        "manifest",
        "canal",
        "--kubeconfig",
        kc,
        "--namespace",
        "kube-system",
    ]);
    assert!(manifest.status.success(), "{}", text(&manifest));
    let manifest_path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(manifest_path.path(), &manifest.stdout).unwrap();
    let listed = cp
        .kubectl()
        .unwrap()
        .args(["get", "-f"])
        .arg(manifest_path.path())
        .args(["-o", "name"])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "objects missing after install:\n{}",
        text(&listed)
    );
    let names = String::from_utf8_lossy(&listed.stdout).to_string();
    for expected in [
        "canalnetwork.canal.dev/default",
        "daemonset.apps/canal-agent",
        "deployment.apps/canal-controller",
        "clusterrole.rbac.authorization.k8s.io/canal-agent",
        "clusterrole.rbac.authorization.k8s.io/canal-controller",
        "validatingadmissionpolicy.admissionregistration.k8s.io/canal-agent-node-restriction",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/canal-agent-node-restriction",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not installed; got:\n{names}"
        );
    }
    let crds = cp
        .kubectl()
        .unwrap()
        .args(["get", "crd", "-o", "name"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&crds.stdout)
            .matches("canal.dev")
            .count(),
        4,
        "CanalNetwork, NodePolicySet, PolicyGroup, PeerSet"
    );

    // An upgrade with a changed value changes the CanalNetwork.
    let out = helm(&[
        "upgrade",
        "canal",
        chart,
        "--kubeconfig",
        kc,
        "--namespace",
        "kube-system",
        "--reuse-values",
        "--set",
        "network.backend.vni=42",
        "--set",
        "network.masquerade=false",
        "--wait=false",
    ]);
    assert!(out.status.success(), "helm upgrade failed:\n{}", text(&out));
    let nets: Api<CanalNetwork> = Api::all(cp.client());
    let net = nets.get("default").await.unwrap();
    assert_eq!(net.spec.backend.vni, 42);
    assert!(!net.spec.masquerade);

    // Uninstall removes every object of the release; the CRDs stay (Helm
    // never deletes CRDs from crds/, so no user's CanalNetwork is lost).
    let out = helm(&[
        "uninstall",
        "canal",
        "--kubeconfig",
        kc,
        "--namespace",
        "kube-system",
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "helm uninstall failed:\n{}",
        text(&out)
    );
    let left = cp
        .kubectl()
        .unwrap()
        .args(["get", "-f"])
        .arg(manifest_path.path())
        .args(["-o", "name", "--ignore-not-found"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "left behind after uninstall"
    );
    let crds = cp
        .kubectl()
        .unwrap()
        .args(["get", "crd", "-o", "name"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&crds.stdout)
            .matches("canal.dev")
            .count(),
        4,
        "CRDs stay"
    );
}
