//! canal-agent credentials reach only their own node (issue 10.2), against a
//! real kube-apiserver with the chart installed by helm: two Pods of the
//! agent's ServiceAccount bound to two Nodes (no kubelet needed: a bound
//! token only needs the Pod object), a TokenRequest bound to each, and with
//! those tokens every write an agent makes on its own node succeeds while
//! every write on the other node, and every write outside canal's fields on
//! its own Node, is refused with a message that says why.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use canal_crds::NodePolicySet;
use canal_e2e::ControlPlane;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, ResourceExt};
use serde_json::json;

const NS: &str = "kube-system";
const AGENT_SA: &str = "canal-agent";
const POLICY: &str = "canal-agent-node-restriction";

fn chart() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/canal")
}

fn install_chart(cp: &ControlPlane) {
    let helm = canal_e2e::helm::helm().expect("helm is available");
    let kc = cp.kubeconfig();
    let out = Command::new(helm)
        .args(["install", "canal"])
        .arg(chart())
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["--namespace", NS, "--wait=false"])
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm install failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn create_node(admin: &Client, name: &str, ip: &str) {
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        )
        .await
        .unwrap();
    // What a kubelet reports.
    nodes
        .patch_status(
            name,
            &PatchParams::apply("kubelet").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": ip},
                                  {"type": "Hostname", "address": name}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                    "message": "kubelet is posting ready status",
                                    "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                                    "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                    "capacity": {"cpu": "2", "pods": "110"},
                }
            })),
        )
        .await
        .unwrap();
}

async fn create_node_policy_set(admin: &Client, name: &str) {
    let api: Api<NodePolicySet> = Api::all(admin.clone());
    api.create(
        &PostParams::default(),
        &NodePolicySet::new(name, canal_crds::NodePolicySetSpec::default()),
    )
    .await
    .unwrap();
}

/// The agent Pod of `node` (never runs: only its object matters) and a
/// token bound to it, as the kubelet would project into it.
async fn agent_token(admin: &Client, node: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("canal-agent-{node}")},
        "spec": {"nodeName": node, "serviceAccountName": AGENT_SA,
                 "containers": [{"name": "agent", "image": "registry.invalid/canal"}]}
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    mint(
        admin,
        Some(BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
        }),
    )
    .await
}

async fn mint(admin: &Client, bound: Option<BoundObjectReference>) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), NS);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            bound_object_ref: bound,
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = sas
        .create_token_request(AGENT_SA, &PostParams::default(), &request)
        .await
        .expect("TokenRequest for the agent ServiceAccount");
    answer
        .status
        .and_then(|s| s.token)
        .expect("the TokenRequest answers with a token")
}

async fn token_client(cp: &ControlPlane, name: &str, token: &str) -> Client {
    let path = cp.layout.dir.join(format!("{name}.kubeconfig"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n",
        cp.server,
        cp.pki.ca_cert.display()
    );
    std::fs::write(&path, text).unwrap();
    canal_e2e::control_plane::client_from_kubeconfig(&path)
        .await
        .unwrap()
}

/// The outcome of one write: Ok, or (HTTP code, message).
type Outcome = Result<(), (u16, String)>;

fn outcome<T>(r: Result<T, kube::Error>) -> Outcome {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) => Err((s.code, s.message)),
        Err(e) => Err((0, e.to_string())),
    }
}

/// The writes an agent makes, with `client`, aimed at `node`.
struct Agent {
    client: Client,
    /// The node the token was minted for.
    home: String,
}

impl Agent {
    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }
    fn npss(&self) -> Api<NodePolicySet> {
        Api::all(self.client.clone())
    }

    /// canal-agent's own write: NetworkUnavailable=False (strategic merge).
    async fn network_available(&self, node: &str) -> Outcome {
        let now = "2026-02-02T00:00:00Z";
        let patch = json!({"status": {"conditions": [{
            "type": "NetworkUnavailable", "status": "False", "reason": "CanalIsUp",
            "message": "canal-agent has programmed the pod network on this node",
            "lastTransitionTime": now, "lastHeartbeatTime": now}]}});
        outcome(
            self.nodes()
                .patch_status(
                    node,
                    &PatchParams {
                        field_manager: Some("canal-agent".into()),
                        ..Default::default()
                    },
                    &Patch::Strategic(&patch),
                )
                .await,
        )
    }

    /// A per-node canal condition, server-side applied (issue 10.5).
    async fn canal_condition(&self, node: &str, status: &str) -> Outcome {
        let body = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
            "status": {"conditions": [{"type": "CanalNetworkProgrammed", "status": status,
                "reason": "Programmed", "message": "overlay and policy programmed",
                "lastHeartbeatTime": "2026-02-02T00:00:00Z",
                "lastTransitionTime": "2026-02-02T00:00:00Z"}]}});
        outcome(
            self.nodes()
                .patch_status(
                    node,
                    &PatchParams::apply("canal-agent").force(),
                    &Patch::Apply(&body),
                )
                .await,
        )
    }

    /// Any other strategic-merge patch of a Node's status subresource.
    async fn node_status_patch(&self, node: &str, patch: serde_json::Value) -> Outcome {
        outcome(
            self.nodes()
                .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
                .await,
        )
    }

    /// PUT of the whole Node status with the InternalIP changed.
    async fn node_status_put(&self, admin: &Client, node: &str, ip: &str) -> Outcome {
        let mut n: Node = Api::<Node>::all(admin.clone()).get(node).await.unwrap();
        let addresses = n.status.as_mut().unwrap().addresses.as_mut().unwrap();
        addresses[0].address = ip.into();
        outcome(
            self.nodes()
                .replace_status(node, &PostParams::default(), &n)
                .await,
        )
    }

    /// canal-agent's NodePolicySet status write (server-side apply).
    async fn nps_status(&self, name: &str, enforced: bool) -> Outcome {
        let body = json!({"apiVersion": "canal.dev/v1alpha1", "kind": "NodePolicySet",
            "metadata": {"name": name},
            "status": {"observedGeneration": 1, "conditions": [{
                "type": "Enforced", "status": if enforced { "True" } else { "False" },
                "reason": if enforced { "Programmed" } else { "ApplyFailed" },
                "message": "forged?", "lastTransitionTime": "2026-02-02T00:00:00Z"}]}});
        outcome(
            self.npss()
                .patch_status(
                    name,
                    &PatchParams::apply("canal-agent").force(),
                    &Patch::Apply(&body),
                )
                .await,
        )
    }

    async fn nps_status_merge(&self, name: &str) -> Outcome {
        outcome(
            self.npss()
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"observedGeneration": 99}})),
                )
                .await,
        )
    }

    async fn nps_status_put(&self, admin: &Client, name: &str) -> Outcome {
        let mut nps = Api::<NodePolicySet>::all(admin.clone())
            .get(name)
            .await
            .unwrap();
        nps.status.get_or_insert_default().observed_generation = Some(42);
        outcome(
            self.npss()
                .replace_status(name, &PostParams::default(), &nps)
                .await,
        )
    }

    /// An Event as the agent publishes one, about `node`, reported as `instance`.
    async fn event(&self, node: &str, instance: &str, reason: &str) -> Outcome {
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: "canal-agent".into(),
                instance: Some(instance.into()),
            },
        );
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some("drift repaired".into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        outcome(recorder.publish(&ev, &reference).await)
    }
}

/// Polls until the policy is in force (the API server loads a new policy
/// and binding asynchronously): a dry-run cross-node write is refused.
async fn wait_policy_active(agent: &Agent, other: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pp = PatchParams {
            dry_run: true,
            ..Default::default()
        };
        let r = agent
            .nodes()
            .patch_status(
                other,
                &pp,
                &Patch::Strategic(json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "True"}]}})),
            )
            .await;
        if let Err(kube::Error::Api(s)) = &r
            && s.message.contains(POLICY)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the admission policy is not in force after 30 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Binds a ClusterRole that allows every write on what an agent touches and
/// more, to the agent's ServiceAccount (the mistake an operator could make).
async fn grant_everything(admin: &Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "too-wide"},
                "rules": [{"apiGroups": ["", "canal.dev"], "verbs": ["*"],
                           "resources": ["nodes", "nodes/status", "nodepolicysets",
                                         "nodepolicysets/status", "peersets", "policygroups",
                                         "canalnetworks", "configmaps"]}]
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "too-wide"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "too-wide"},
                "subjects": [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": NS}]
            }))
            .unwrap(),
        )
        .await
        .unwrap();
}

/// Waits until RBAC lets the agent PUT its own NodePolicySet status (dry run).
async fn wait_rbac_allows(agent: &Agent, admin: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let nps = Api::<NodePolicySet>::all(admin.clone())
        .get(&agent.home)
        .await
        .unwrap();
    loop {
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let r = agent.npss().replace_status(&agent.home, &pp, &nps).await;
        if r.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "RBAC grant not in force: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every attempt with its outcome, printed as a table at the end.
#[derive(Default)]
struct Tally {
    rows: Vec<(String, bool, Outcome)>,
    failures: Vec<String>,
}

impl Tally {
    /// A write that must succeed.
    fn allowed(&mut self, what: &str, got: Outcome) {
        if let Err((code, msg)) = &got {
            self.failures
                .push(format!("{what}: must succeed, refused {code}: {msg}"));
        }
        self.rows.push((what.to_string(), true, got));
    }

    /// A write that must be refused by the policy with a message containing
    /// every one of `needles`.
    fn refused(&mut self, what: &str, got: Outcome, needles: &[&str]) {
        match &got {
            Ok(()) => self.failures.push(format!("{what}: was ALLOWED")),
            Err((code, msg)) => {
                let missing: Vec<&&str> = needles.iter().filter(|n| !msg.contains(**n)).collect();
                if *code != 403 || !missing.is_empty() {
                    self.failures.push(format!(
                        "{what}: expected 403 with {missing:?}, got {code}: {msg}"
                    ));
                }
            }
        }
        self.rows.push((what.to_string(), false, got));
    }

    fn report(&self) -> String {
        let mut out = String::new();
        let (mut attempted, mut refused) = (0, 0);
        for (what, expect_ok, got) in &self.rows {
            let verdict = match got {
                Ok(()) => "allowed".to_string(),
                Err((code, msg)) => format!("refused {code}: {msg}"),
            };
            if !expect_ok {
                attempted += 1;
                refused += usize::from(got.is_err());
            }
            out.push_str(&format!("  {what:<58} {verdict}\n"));
        }
        out.push_str(&format!(
            "  forbidden writes attempted: {attempted}, refused: {refused}\n"
        ));
        out
    }
}

#[tokio::test]
async fn agent_tokens_write_only_their_own_node() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    let admin = cp.client();
    install_chart(&cp);
    for (node, ip) in [("node-1", "192.168.50.11"), ("node-2", "192.168.50.12")] {
        create_node(&admin, node, ip).await;
        create_node_policy_set(&admin, node).await;
    }
    let a1 = Agent {
        client: token_client(&cp, "agent-1", &agent_token(&admin, "node-1").await).await,
        home: "node-1".into(),
    };
    let a2 = Agent {
        client: token_client(&cp, "agent-2", &agent_token(&admin, "node-2").await).await,
        home: "node-2".into(),
    };
    let unbound = Agent {
        client: token_client(&cp, "unbound", &mint(&admin, None).await).await,
        home: String::new(),
    };
    wait_policy_active(&a1, "node-2").await;
    let node2_before = Api::<Node>::all(admin.clone()).get("node-2").await.unwrap();
    let nps2_before = Api::<NodePolicySet>::all(admin.clone())
        .get("node-2")
        .await
        .unwrap();

    let mut t = Tally::default();
    let cross = "canal-agent on node node-1 may write only its own Node node-1, not Node node-2";
    let cross_nps = "canal-agent on node node-1 may write only its own NodePolicySet node-1, not NodePolicySet node-2";

    // What an agent does on its own node.
    for a in [&a1, &a2] {
        let n = a.home.as_str();
        t.allowed(
            &format!("{n}: own Node NetworkUnavailable=False"),
            a.network_available(n).await,
        );
        t.allowed(
            &format!("{n}: own Node condition CanalNetworkProgrammed (apply)"),
            a.canal_condition(n, "True").await,
        );
        t.allowed(
            &format!("{n}: own NodePolicySet status (apply)"),
            a.nps_status(n, true).await,
        );
        t.allowed(
            &format!("{n}: Event about own Node"),
            a.event(n, n, "DriftRepaired").await,
        );
        t.allowed(
            &format!("{n}: the same Event again (series patch)"),
            a.event(n, n, "DriftRepaired").await,
        );
    }

    // The attack of issue 10.2 and its siblings, node-1's token on node-2.
    t.refused(
        "node-1 -> node-2 NetworkUnavailable condition",
        a1.network_available("node-2").await,
        &[POLICY, cross],
    );
    t.refused(
        "node-1 -> node-2 canal condition (apply)",
        a1.canal_condition("node-2", "False").await,
        &[cross],
    );
    t.refused(
        "node-1 -> node-2 InternalIP (strategic patch)",
        a1.node_status_patch(
            "node-2",
            json!({"status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.11"}]}}),
        )
        .await,
        &[cross],
    );
    // RBAC has no update verb (the agent never PUTs): refused before admission.
    t.refused(
        "node-1 -> node-2 InternalIP (PUT status)",
        a1.node_status_put(&admin, "node-2", "192.168.50.11").await,
        &["cannot update resource \"nodes/status\""],
    );
    t.refused(
        "node-1 -> node-2 public-ip-overwrite via nodes/status",
        a1.node_status_patch(
            "node-2",
            json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip-overwrite": "192.168.50.11"}}}),
        )
        .await,
        &[cross],
    );
    t.refused(
        "node-1 -> node-2 NodePolicySet Enforced=False (apply)",
        a1.nps_status("node-2", false).await,
        &[cross_nps],
    );
    t.refused(
        "node-1 -> node-2 NodePolicySet status (merge patch)",
        a1.nps_status_merge("node-2").await,
        &[cross_nps],
    );
    t.refused(
        "node-1 -> node-2 NodePolicySet status (PUT)",
        a1.nps_status_put(&admin, "node-2").await,
        &["cannot update resource \"nodepolicysets/status\""],
    );
    t.refused(
        "node-1 -> Event about node-2",
        a1.event("node-2", "node-1", "Forged").await,
        &["may publish Events only about its own Node node-1, not about Node node-2"],
    );
    t.refused(
        "node-1 -> Event about node-2 reported as node-2",
        a1.event("node-2", "node-2", "Forged").await,
        &["may publish Events only about its own Node node-1"],
    );
    t.refused(
        "node-1 -> Event about node-1 reported as node-2",
        a1.event("node-1", "node-2", "Forged").await,
        &["must publish its Events reported as its own node node-1, not as node-2"],
    );
    // The other direction.
    t.refused(
        "node-2 -> node-1 InternalIP (strategic patch)",
        a2.node_status_patch(
            "node-1",
            json!({"status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.12"}]}}),
        )
        .await,
        &["canal-agent on node node-2 may write only its own Node node-2, not Node node-1"],
    );
    t.refused(
        "node-2 -> node-1 NodePolicySet Enforced=False (apply)",
        a2.nps_status("node-1", false).await,
        &["not NodePolicySet node-1"],
    );

    // Its own Node, outside canal's conditions: the kubelet's fields.
    t.refused(
        "node-1 -> own InternalIP",
        a1.node_status_patch(
            "node-1",
            json!({"status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.99"}]}}),
        )
        .await,
        &["may not change status.addresses of its Node"],
    );
    t.refused(
        "node-1 -> own public-ip-overwrite via nodes/status",
        a1.node_status_patch(
            "node-1",
            json!({"metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip-overwrite": "203.0.113.7"}}}),
        )
        .await,
        &["may not change metadata.annotations of its Node"],
    );
    t.refused(
        "node-1 -> own label via nodes/status",
        a1.node_status_patch(
            "node-1",
            json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}),
        )
        .await,
        &["may not change metadata.labels of its Node"],
    );
    t.refused(
        "node-1 -> own Ready condition",
        a1.node_status_patch(
            "node-1",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        )
        .await,
        &["may not change the Node condition(s) Ready: only NetworkUnavailable"],
    );
    t.refused(
        "node-1 -> own capacity",
        a1.node_status_patch("node-1", json!({"status": {"capacity": {"pods": "1000"}}}))
            .await,
        &["may not change status.capacity of its Node"],
    );
    // A token that names no node: refused even for its "own" writes.
    t.refused(
        "unbound token -> node-1 NetworkUnavailable",
        unbound.network_available("node-1").await,
        &["do not name the node they belong to"],
    );
    t.refused(
        "unbound token -> NodePolicySet node-1 status",
        unbound.nps_status("node-1", true).await,
        &["do not name the node they belong to"],
    );

    // A ClusterRole granted too widely by mistake does not widen what an
    // agent can do: the policy matches every resource, whatever RBAC says.
    grant_everything(&admin).await;
    wait_rbac_allows(&a1, &admin).await;
    t.allowed(
        "node-1 (wide RBAC): own NodePolicySet status (PUT)",
        a1.nps_status_put(&admin, "node-1").await,
    );
    t.refused(
        "node-1 (wide RBAC) -> node-2 InternalIP (PUT status)",
        a1.node_status_put(&admin, "node-2", "192.168.50.11").await,
        &[cross],
    );
    t.refused(
        "node-1 (wide RBAC) -> node-2 NodePolicySet status (PUT)",
        a1.nps_status_put(&admin, "node-2").await,
        &[cross_nps],
    );
    t.refused(
        "node-1 (wide RBAC) -> own Node labels (main resource)",
        outcome(
            a1.nodes()
                .patch(
                    "node-1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await,
        ),
        &["may only update the status of its own Node and NodePolicySet, not UPDATE nodes node-1"],
    );
    t.refused(
        "node-1 (wide RBAC) -> delete own NodePolicySet",
        outcome(a1.npss().delete("node-1", &Default::default()).await),
        &["not DELETE canal.dev/nodepolicysets node-1"],
    );
    t.refused(
        "node-1 (wide RBAC) -> create a PeerSet",
        outcome(
            Api::<canal_crds::PeerSet>::all(a1.client.clone())
                .create(
                    &PostParams::default(),
                    &canal_crds::PeerSet::new("forged", canal_crds::PeerSetSpec::default()),
                )
                .await,
        ),
        &["never writes canal.dev/peersets"],
    );
    t.refused(
        "node-1 (wide RBAC) -> create a PolicyGroup",
        outcome(
            Api::<canal_crds::PolicyGroup>::all(a1.client.clone())
                .create(
                    &PostParams::default(),
                    &canal_crds::PolicyGroup::new("forged", canal_crds::PolicyGroupSpec::default()),
                )
                .await,
        ),
        &["never writes canal.dev/policygroups"],
    );
    t.refused(
        "node-1 (wide RBAC) -> edit the CanalNetwork",
        outcome(
            Api::<canal_crds::CanalNetwork>::all(a1.client.clone())
                .patch(
                    "default",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"masquerade": false}})),
                )
                .await,
        ),
        &["never writes canal.dev/canalnetworks"],
    );
    t.refused(
        "node-1 (wide RBAC) -> create a ConfigMap",
        outcome(
            Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(a1.client.clone(), NS)
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap(),
                )
                .await,
        ),
        &["never writes configmaps"],
    );

    let report = t.report();
    println!("{report}");
    assert!(
        t.failures.is_empty(),
        "{}\n\nall attempts:\n{report}",
        t.failures.join("\n")
    );

    // Nothing of node-2 moved, and node-1 shows what its agent wrote.
    let node2 = Api::<Node>::all(admin.clone()).get("node-2").await.unwrap();
    let st = |n: &Node| {
        let s = n.status.clone().unwrap_or_default();
        (s.addresses, s.capacity, n.annotations().clone())
    };
    assert_eq!(st(&node2), st(&node2_before), "node-2 changed");
    let conditions = |n: &Node| -> Vec<(String, String)> {
        let mut c: Vec<(String, String)> = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.type_, c.status))
            .collect();
        c.sort();
        c
    };
    assert_eq!(
        conditions(&node2),
        vec![
            ("CanalNetworkProgrammed".into(), "True".into()),
            ("NetworkUnavailable".into(), "False".into()),
            ("Ready".into(), "True".into())
        ],
        "node-2 shows only what its own agent wrote"
    );
    let nps2 = Api::<NodePolicySet>::all(admin.clone())
        .get("node-2")
        .await
        .unwrap();
    assert_ne!(nps2.status, nps2_before.status, "node-2's agent wrote it");
    let enforced = nps2
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Enforced"))
        .map(|c| c.status.clone());
    assert_eq!(
        enforced.as_deref(),
        Some("True"),
        "the forgery did not land"
    );
    let node1 = Api::<Node>::all(admin.clone()).get("node-1").await.unwrap();
    let addr = node1.status.unwrap().addresses.unwrap()[0].address.clone();
    assert_eq!(addr, "192.168.50.11");
}
