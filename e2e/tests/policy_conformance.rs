//! NetworkPolicy conformance with real packets (issue 5), the upstream
//! Kubernetes e2e model: namespaces x, y, z (label `ns=<name>`), pods a, b,
//! c in each (label `pod=<name>`) spread over three nodes, each serving TCP
//! and UDP 80 and 81 (`serve-80-tcp` ... `serve-81-udp`). Every scenario is
//! checked as four 9x9 truth tables (two ports x two protocols) against the
//! reference model in `canal_e2e::policy_model`, after waiting until the
//! controller has compiled the cluster and every agent reports its
//! NodePolicySet enforced (no sleeps). One lab serves every scenario;
//! policies are removed between scenarios.

mod support;

use std::time::{Duration, Instant};

use canal_e2e::Lab;
use canal_e2e::lab::{PodOptions, Protocol, UpOptions};
use support::policy::{
    Outcome, apply_policies, check, check_host_sources, delete_all_policies, host_address,
    label_namespace, label_pod, wait_enforced,
};
use support::serial;

/// Runs scenarios in order on one lab and reports them together.
struct Suite<'a> {
    lab: &'a Lab,
    outcomes: Vec<Outcome>,
    current: Option<(String, Instant)>,
}

impl<'a> Suite<'a> {
    fn new(lab: &'a Lab) -> Suite<'a> {
        Suite {
            lab,
            outcomes: Vec::new(),
            current: None,
        }
    }

    /// Starts a scenario: every policy of the last one is removed (the next
    /// check waits until that and the new state are enforced).
    async fn begin(&mut self, name: &str) {
        assert!(self.current.is_none(), "scenario not checked");
        delete_all_policies(&self.lab.client()).await;
        self.current = Some((name.to_string(), Instant::now()));
    }

    /// Checks the running scenario.
    async fn check(&mut self) -> &mut Outcome {
        let (name, started) = self.current.take().expect("begin first");
        let outcome = check(self.lab, &name, started).await;
        eprintln!(
            "{:>3}. {:<72} {} (enforced after {} ms, {} probes, {:.1} s)",
            self.outcomes.len() + 1,
            name,
            if outcome.failure.is_some() {
                "FAILED"
            } else {
                "ok"
            },
            outcome.enforced_after.as_millis(),
            outcome.probes,
            outcome.duration.as_secs_f64()
        );
        self.outcomes.push(outcome);
        self.outcomes.last_mut().expect("just pushed")
    }

    /// A scenario made of policies only.
    async fn policies(&mut self, name: &str, yaml: &str) {
        self.begin(name).await;
        apply_policies(&self.lab.client(), yaml).await;
        self.check().await;
    }

    fn finish(self, started: Instant) {
        let failed: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| o.failure.is_some())
            .collect();
        let probes: usize = self.outcomes.iter().map(|o| o.probes).sum();
        let mut enforced: Vec<u128> = self
            .outcomes
            .iter()
            .map(|o| o.enforced_after.as_millis())
            .collect();
        enforced.sort_unstable();
        eprintln!(
            "{} scenarios, {probes} probes, {:.1} s in all (lab up included); apply -> enforced everywhere: median {} ms, max {} ms",
            self.outcomes.len(),
            started.elapsed().as_secs_f64(),
            enforced[enforced.len() / 2],
            enforced.last().copied().unwrap_or_default()
        );
        if !failed.is_empty() {
            let mut text = String::new();
            for o in &failed {
                text.push_str(&format!(
                    "\n=== {} ===\n{}\n",
                    o.name,
                    o.failure.as_deref().unwrap_or_default()
                ));
            }
            panic!(
                "{} of {} scenarios failed:{text}",
                failed.len(),
                self.outcomes.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_policy_truth_tables() {
    let _serial = serial().await;
    let started = Instant::now();
    let lab = Lab::up(
        Lab::test_state_dir("policy-conformance"),
        UpOptions {
            nodes: 3,
            ..UpOptions::default()
        },
    )
    .await
    .expect("a 3-node lab");
    lab.add_conformance_pods().await.expect("conformance pods");
    let ip = |key: &str| lab.pod(key).unwrap().ipv4().unwrap();
    let client = lab.client();
    let mut s = Suite::new(&lab);

    s.policies("no policies: every pod reaches every pod", "")
        .await;

    // Isolation and defaulting.
    s.policies(
        "deny all ingress in x (policyTypes defaulted to Ingress)",
        "metadata: {namespace: x, name: deny-ingress}\nspec: {podSelector: {}}",
    )
    .await;
    s.policies(
        "deny all ingress in x (policyTypes [Ingress], empty rules)",
        "metadata: {namespace: x, name: deny-ingress}\nspec: {podSelector: {}, policyTypes: [Ingress], ingress: []}",
    )
    .await;
    s.policies(
        "deny all egress in x",
        "metadata: {namespace: x, name: deny-egress}\nspec: {podSelector: {}, policyTypes: [Egress]}",
    )
    .await;
    s.policies(
        "deny all ingress and egress in x",
        "metadata: {namespace: x, name: deny-all}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
    )
    .await;
    s.policies(
        "deny all plus allow all ingress in x: allows are a union",
        "metadata: {namespace: x, name: deny}\nspec: {podSelector: {}}\n---\nmetadata: {namespace: x, name: allow-all}\nspec: {podSelector: {}, ingress: [{}]}",
    )
    .await;
    s.policies(
        "egress rules without policyTypes isolate both directions",
        "metadata: {namespace: x, name: egress-defaulted}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress: [{to: [{podSelector: {}}]}]",
    )
    .await;
    s.policies(
        "egress only: z may reach namespace y",
        "metadata: {namespace: z, name: to-y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
    )
    .await;
    s.policies(
        "deny all egress in x, allow ingress to x/a from y",
        "metadata: {namespace: x, name: deny-egress}\nspec: {podSelector: {}, policyTypes: [Egress]}\n---\nmetadata: {namespace: x, name: a-from-y}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
    )
    .await;

    // Peers.
    s.policies(
        "x/a from pods of x labelled pod=b",
        "metadata: {namespace: x, name: a-from-b}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
    )
    .await;
    s.policies(
        "x/a from namespaces labelled ns=y",
        "metadata: {namespace: x, name: a-from-y}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]",
    )
    .await;
    s.policies(
        "x/a from every namespace (namespaceSelector {})",
        "metadata: {namespace: x, name: a-from-all}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}}]}]",
    )
    .await;
    s.policies(
        "namespace and pod selector in one peer: only y/c",
        "metadata: {namespace: x, name: a-from-yc}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: c}}}]}]",
    )
    .await;
    s.policies(
        "namespace and pod selector as two peers: y/* or x/c",
        "metadata: {namespace: x, name: a-from-y-or-c}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: c}}}]}]",
    )
    .await;
    s.policies(
        "matchExpressions In: z/c from pods a and b of every namespace",
        "metadata: {namespace: z, name: c-from-ab}\nspec:\n  podSelector: {matchLabels: {pod: c}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}}]}]",
    )
    .await;
    s.policies(
        "matchExpressions NotIn: z from namespaces other than x",
        "metadata: {namespace: z, name: not-from-x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}]}]",
    )
    .await;
    s.policies(
        "matchExpressions Exists (x/a from all) and DoesNotExist (x/b from none)",
        "metadata: {namespace: x, name: a-exists}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: Exists}]}, podSelector: {matchExpressions: [{key: pod, operator: Exists}]}}]}]\n---\nmetadata: {namespace: x, name: b-not-exists}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: DoesNotExist}]}}]}]",
    )
    .await;
    s.policies(
        "two policies on x/a: the union of their rules",
        "metadata: {namespace: x, name: a-from-b}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n---\nmetadata: {namespace: x, name: a-from-z}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: z}}}]}]",
    )
    .await;
    s.policies(
        "empty podSelector selects its own namespace only: y only from y",
        "metadata: {namespace: y, name: only-y}\nspec:\n  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]",
    )
    .await;
    s.policies(
        "a policy in namespace z selecting pod=a does not touch x/a or y/a",
        "metadata: {namespace: z, name: deny-a}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]",
    )
    .await;
    s.policies(
        "ingress and egress on one pod: x/a from y, to z",
        "metadata: {namespace: x, name: a-both}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: z}}}]}]",
    )
    .await;

    // ipBlock.
    s.policies(
        "ipBlock with except: x/a from the cluster except y/b",
        &format!(
            "metadata: {{namespace: x, name: a-block}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{}/32]}}}}]}}]",
            ip("y/b")
        ),
    )
    .await;
    let node3 = host_address(&client, "node-3").await;
    s.policies(
        "ipBlock egress: x/b only to node-3's pod subnet",
        &format!(
            "metadata: {{namespace: x, name: b-to-node3}}\nspec:\n  podSelector: {{matchLabels: {{pod: b}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{ipBlock: {{cidr: {node3}/24}}}}]}}]"
        ),
    )
    .await;
    s.policies(
        "ipBlock of two pod IPs (and a peer list mixing ipBlock and selectors)",
        &format!(
            "metadata: {{namespace: y, name: b-from-ips}}\nspec:\n  podSelector: {{matchLabels: {{pod: b}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {}/32}}}}, {{ipBlock: {{cidr: {}/32}}}}, {{podSelector: {{matchLabels: {{pod: c}}}}}}]}}]",
            ip("x/a"),
            ip("z/b")
        ),
    )
    .await;

    // Ports and protocols.
    s.policies(
        "numeric port: x/a on TCP 80 only",
        "metadata: {namespace: x, name: a-tcp80}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80, protocol: TCP}]}]",
    )
    .await;
    s.policies(
        "endPort range: x/a on TCP 80-81",
        "metadata: {namespace: x, name: a-range}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80, endPort: 81, protocol: TCP}]}]",
    )
    .await;
    s.policies(
        "endPort range 79-80 on UDP leaves 81 out",
        "metadata: {namespace: y, name: udp-range}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 79, endPort: 80, protocol: UDP}]}]",
    )
    .await;
    s.policies(
        "UDP only: y on UDP 81 from x",
        "metadata: {namespace: y, name: udp81}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: x}}}], ports: [{port: 81, protocol: UDP}]}]",
    )
    .await;
    s.policies(
        "a port without protocol means TCP",
        "metadata: {namespace: z, name: port81}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 81}]}]",
    )
    .await;
    s.policies(
        "named port ingress: x on serve-81-tcp",
        "metadata: {namespace: x, name: named-in}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: serve-81-tcp}]}]",
    )
    .await;
    s.policies(
        "named port egress: x to serve-80-udp anywhere",
        "metadata: {namespace: x, name: named-out}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: serve-80-udp, protocol: UDP}]}]",
    )
    .await;
    s.policies(
        "named port egress with a peer: x/a to z on serve-81-tcp",
        "metadata: {namespace: x, name: named-peer}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: z}}}], ports: [{port: serve-81-tcp, protocol: TCP}]}]",
    )
    .await;
    s.policies(
        "a port no pod declares is harmless: x/a from x/b on any port only",
        "metadata: {namespace: x, name: a-odd}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: no-such-port}, {port: 8080}]\n  - from: [{podSelector: {matchLabels: {pod: b}}}]",
    )
    .await;
    s.policies(
        "an SCTP-only rule allows no TCP or UDP",
        "metadata: {namespace: x, name: a-sctp}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: 80, protocol: SCTP}]}]",
    )
    .await;

    // Changes of pods and namespaces move them in and out.
    s.begin("a pod labelled into a policy's podSelector is isolated")
        .await;
    apply_policies(
        &client,
        "metadata: {namespace: y, name: isolate-marked}\nspec:\n  podSelector: {matchLabels: {role: isolated}}\n  policyTypes: [Ingress, Egress]",
    )
    .await;
    label_pod(&client, "y/b", "role", Some("isolated")).await;
    s.check().await;
    s.begin("... and released when the label goes").await;
    apply_policies(
        &client,
        "metadata: {namespace: y, name: isolate-marked}\nspec:\n  podSelector: {matchLabels: {role: isolated}}\n  policyTypes: [Ingress, Egress]",
    )
    .await;
    label_pod(&client, "y/b", "role", None).await;
    s.check().await;

    s.begin("a pod labelled into a peer set is admitted").await;
    apply_policies(
        &client,
        "metadata: {namespace: x, name: a-from-clients}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]}]",
    )
    .await;
    label_pod(&client, "z/c", "role", Some("client")).await;
    s.check().await;
    label_pod(&client, "z/c", "role", None).await;

    s.begin("a namespace labelled into a namespaceSelector is admitted")
        .await;
    apply_policies(
        &client,
        "metadata: {namespace: x, name: a-from-blue}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]",
    )
    .await;
    label_namespace(&client, "z", "team", Some("blue")).await;
    s.check().await;
    label_namespace(&client, "z", "team", None).await;

    s.begin("pods deleted and re-created on other nodes keep their policies")
        .await;
    apply_policies(
        &client,
        "metadata: {namespace: x, name: a-from-b}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]\n---\nmetadata: {namespace: y, name: deny-b}\nspec:\n  podSelector: {matchLabels: {pod: b}}",
    )
    .await;
    wait_enforced(&lab, Duration::from_secs(30)).await;
    let before = (ip("x/b"), ip("y/b"));
    lab.del_pod("x/b").await.unwrap();
    lab.del_pod("y/b").await.unwrap();
    lab.add_pods(vec![
        PodOptions::new("x", "b", "node-3").label("pod", "b"),
        PodOptions::new("y", "b", "node-1").label("pod", "b"),
    ])
    .await
    .unwrap();
    assert_ne!(
        (ip("x/b"), ip("y/b")),
        before,
        "re-created on other nodes: new addresses"
    );
    s.check().await;

    s.begin("a host source (hostNetwork view) matches ipBlocks only: z from node-1's address")
        .await;
    let node1 = host_address(&client, "node-1").await;
    apply_policies(
        &client,
        &format!(
            "metadata: {{namespace: z, name: from-node1}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: {node1}/32}}}}, {{podSelector: {{matchLabels: {{pod: none}}}}}}]}}]"
        ),
    )
    .await;
    let outcome = s.check().await;
    if outcome.failure.is_none() {
        let model = wait_enforced(&lab, Duration::from_secs(30)).await;
        for (port, protocol) in [(80, Protocol::Tcp), (80, Protocol::Udp)] {
            if let Some(bad) = check_host_sources(&lab, &model, port, protocol).await {
                outcome.failure = Some(format!("host sources:\n{bad}"));
                break;
            }
        }
    }

    delete_all_policies(&client).await;
    s.finish(started);
}
