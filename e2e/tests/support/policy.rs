//! NetworkPolicy end-to-end helpers: apply and remove policies, wait until
//! the controller has compiled the cluster as it is and every agent reports
//! its NodePolicySet enforced, probe whole truth tables on every port,
//! protocol and IP family of the lab at once, and compare them with the
//! reference model ([`canal_e2e::policy_model`]).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use canal_crds::assemble::{assemble_node, assemble_peer_set};
use canal_crds::condition::{ENFORCED, is_true};
use canal_crds::{NodePolicySet, PeerSet, PeerSetObjectSpec, PolicyGroup, PolicyGroupSpec};
use canal_e2e::Lab;
use canal_e2e::lab::matrix::{ProbeJob, run_probes};
use canal_e2e::lab::prober::Prober;
use canal_e2e::lab::{Family, Matrix, PodRecord, Protocol};
use canal_e2e::policy_model::{Cluster, Source};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

/// The ports and protocols every conformance pod serves.
pub const PORTS: [(u16, Protocol); 4] = [
    (80, Protocol::Tcp),
    (81, Protocol::Tcp),
    (80, Protocol::Udp),
    (81, Protocol::Udp),
];

/// One truth table: the family, port and protocol of its connections.
pub type Table = (Family, u16, Protocol);

/// The families the lab's pods have (the lab's `--ip-family`), primary
/// first: every conformance cell is probed in each.
pub fn lab_families(lab: &Lab) -> Vec<Family> {
    lab.context().lab.ip_family.families()
}

/// First probe timeout (a blocked cell costs this much, once per table).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Timeout of the second look at a cell that should connect and did not
/// (a lost SYN is retransmitted after 1 s).
pub const RECHECK_TIMEOUT: Duration = Duration::from_millis(3000);

/// Field manager of what the tests apply.
const MANAGER: &str = "canal-e2e";

/// Server-side applies NetworkPolicies given as YAML documents (`---`
/// separated, `kind` optional); returns their `ns/name`.
pub async fn apply_policies(client: &kube::Client, yaml: &str) -> Vec<String> {
    let mut names = Vec::new();
    for doc in yaml.split("\n---").filter(|d| !d.trim().is_empty()) {
        let mut value: serde_json::Value = serde_yaml::from_str(doc)
            .unwrap_or_else(|e| panic!("policy YAML does not parse: {e}\n{doc}"));
        value["apiVersion"] = "networking.k8s.io/v1".into();
        value["kind"] = "NetworkPolicy".into();
        let np: NetworkPolicy = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("not a NetworkPolicy: {e}\n{doc}"));
        let ns = np.metadata.namespace.clone().expect("policy namespace");
        let name = np.metadata.name.clone().expect("policy name");
        Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await
            .unwrap_or_else(|e| panic!("applying NetworkPolicy {ns}/{name}: {e}"));
        names.push(format!("{ns}/{name}"));
    }
    names
}

/// Deletes every NetworkPolicy in the cluster.
pub async fn delete_all_policies(client: &kube::Client) {
    let all = Api::<NetworkPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("listing NetworkPolicies");
    for np in all {
        let ns = np.metadata.namespace.unwrap_or_default();
        let name = np.metadata.name.unwrap_or_default();
        match Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
            .delete(&name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => panic!("deleting NetworkPolicy {ns}/{name}: {e}"),
        }
    }
}

/// Sets (Some) or removes (None) a label on a Pod.
pub async fn label_pod(client: &kube::Client, key: &str, label: &str, value: Option<&str>) {
    let (ns, name) = key.split_once('/').expect("ns/name");
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {label: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("labelling Pod {key}: {e}"));
}

/// Sets (Some) or removes (None) a label on a Namespace.
pub async fn label_namespace(client: &kube::Client, ns: &str, label: &str, value: Option<&str>) {
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {label: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("labelling Namespace {ns}: {e}"));
}

/// An endpoint as compared: (IPs, ingress policies, egress policies).
type EndpointView = (Vec<String>, Vec<String>, Vec<String>);

/// What differs between the compiled objects and the model, or between
/// the agents' statuses and the NodePolicySets; empty when converged.
async fn convergence_gaps(client: &kube::Client, model: &Cluster) -> Vec<String> {
    let lp = ListParams::default();
    let mut gaps = Vec::new();
    let nodes: BTreeSet<String> = match Api::<Node>::all(client.clone()).list(&lp).await {
        Ok(l) => l
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect(),
        Err(e) => return vec![format!("listing Nodes: {e}")],
    };
    let npss = match Api::<NodePolicySet>::all(client.clone()).list(&lp).await {
        Ok(l) => l.items,
        Err(e) => return vec![format!("listing NodePolicySets: {e}")],
    };
    let sets: BTreeMap<String, PeerSetObjectSpec> =
        match Api::<PeerSet>::all(client.clone()).list(&lp).await {
            Ok(l) => l
                .items
                .into_iter()
                .map(|p| (p.metadata.name.clone().unwrap_or_default(), p.spec))
                .collect(),
            Err(e) => return vec![format!("listing PeerSets: {e}")],
        };
    let groups: BTreeMap<String, PolicyGroupSpec> =
        match Api::<PolicyGroup>::all(client.clone()).list(&lp).await {
            Ok(l) => l
                .items
                .into_iter()
                .map(|g| (g.metadata.name.clone().unwrap_or_default(), g.spec))
                .collect(),
            Err(e) => return vec![format!("listing PolicyGroups: {e}")],
        };
    let by_node: BTreeMap<String, &NodePolicySet> = npss
        .iter()
        .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
        .collect();
    for node in &nodes {
        let Some(nps) = by_node.get(node) else {
            gaps.push(format!("no NodePolicySet for {node}"));
            continue;
        };
        // The controller: endpoints as the model has them.
        let mut want: BTreeMap<String, EndpointView> = BTreeMap::new();
        for pod in model
            .pods
            .iter()
            .filter(|p| p.node == *node && !p.host_network)
        {
            let (ingress, egress) = model.isolation(pod);
            let mut ips: Vec<String> = pod.ips.iter().map(IpAddr::to_string).collect();
            ips.sort();
            want.insert(pod.key(), (ips, ingress, egress));
        }
        // What the agent assembles from the NodePolicySet and its groups.
        let assembled = match assemble_node(node, &nps.spec, |n| groups.get(n)) {
            Ok(a) => a,
            Err(g) => {
                gaps.push(format!("{node}: not consistent yet: {g:?}"));
                continue;
            }
        };
        let have: BTreeMap<String, EndpointView> = assembled
            .endpoints
            .iter()
            .map(|e| {
                let mut ingress = e.ingress_policies.clone();
                let mut egress = e.egress_policies.clone();
                ingress.sort();
                egress.sort();
                let mut ips = e.ips.clone();
                ips.sort();
                (format!("{}/{}", e.namespace, e.pod), (ips, ingress, egress))
            })
            .collect();
        if want != have {
            gaps.push(format!(
                "{node} endpoints (ips, ingress, egress): expected {want:?}, NodePolicySet has {have:?}"
            ));
        }
        // PeerSets it references hold what their selectors match.
        for policy in &assembled.policies {
            for rule in policy.ingress.iter().chain(&policy.egress) {
                let names = rule
                    .peers
                    .iter()
                    .flatten()
                    .filter_map(|p| p.peer_set.clone())
                    .chain(rule.ports.iter().filter_map(|p| p.named_port_set.clone()));
                for name in names {
                    let Some(head) = sets.get(&name) else {
                        gaps.push(format!("{node} references missing PeerSet {name}"));
                        continue;
                    };
                    let set = match assemble_peer_set(&name, head, |n| sets.get(n)) {
                        Ok(s) => s,
                        Err(g) => {
                            gaps.push(format!("PeerSet {name} not consistent yet: {g:?}"));
                            continue;
                        }
                    };
                    let (ips, ports) = model.peer_set_members(&set.selector);
                    let mut have_ips = set.ips.clone();
                    have_ips.sort_by_key(|ip| ip.parse::<IpAddr>().ok());
                    let mut have_ports = set.ports.clone();
                    have_ports.sort();
                    if have_ips != ips || have_ports != ports {
                        gaps.push(format!(
                            "PeerSet {name} ({:?}): expected {ips:?} {ports:?}, has {have_ips:?} {have_ports:?}",
                            set.selector
                        ));
                    }
                }
            }
        }
        // The agent: the latest generation programmed.
        let status = nps.status.clone().unwrap_or_default();
        if status.observed_generation != nps.metadata.generation
            || !is_true(&status.conditions, ENFORCED)
        {
            gaps.push(format!(
                "{node}: generation {:?}, agent reports {:?} {:?}",
                nps.metadata.generation, status.observed_generation, status.conditions
            ));
        }
    }
    gaps
}

/// Waits until canal-controller has compiled the cluster as the API server
/// has it now (every endpoint's isolating policies and IPs, every referenced
/// PeerSet's members) and every agent reports the resulting generation of
/// its NodePolicySet enforced. Returns the model of that state.
pub async fn wait_enforced(lab: &Lab, timeout: Duration) -> Cluster {
    let client = lab.client();
    let deadline = Instant::now() + timeout;
    loop {
        let model = Cluster::from_api(&client)
            .await
            .expect("reading the cluster");
        let gaps = convergence_gaps(&client, &model).await;
        if gaps.is_empty() {
            return model;
        }
        if Instant::now() > deadline {
            panic!(
                "policy not enforced within {timeout:?}:\n  {}",
                gaps.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Probes every pod pair of `pods` on every port and protocol of [`PORTS`]
/// in every family of `families`, all at once (TCP and UDP on two worker
/// pools): one timeout for the whole set, however many families.
pub async fn probe_all(
    pods: &[PodRecord],
    families: &[Family],
    timeout: Duration,
) -> BTreeMap<Table, Matrix> {
    let keys: Vec<String> = pods.iter().map(PodRecord::key).collect();
    let mut cells = Vec::new();
    for &family in families {
        for &(port, protocol) in &PORTS {
            for from in &keys {
                for to in &keys {
                    cells.push((from.clone(), to.clone(), family, port, protocol));
                }
            }
        }
    }
    let connected = reprobe(pods, &cells, timeout).await;
    let mut tables: BTreeMap<Table, Matrix> = families
        .iter()
        .flat_map(|&f| PORTS.iter().map(move |&(port, proto)| (f, port, proto)))
        .map(|k| (k, Matrix::filled(keys.iter().cloned(), false)))
        .collect();
    for ((from, to, family, port, protocol), c) in cells.iter().zip(connected) {
        if let Some(t) = tables.get_mut(&(*family, *port, *protocol)) {
            t.set(from, to, c);
        }
    }
    tables
}

/// One cell to probe: (from, to, family, port, protocol).
pub type Cell = (String, String, Family, u16, Protocol);

/// Probes the given cells (all at once, TCP and UDP on two worker pools);
/// a cell whose ends lack an address of its family is not connected.
pub async fn reprobe(pods: &[PodRecord], cells: &[Cell], timeout: Duration) -> Vec<bool> {
    let by_key: BTreeMap<String, &PodRecord> = pods.iter().map(|p| (p.key(), p)).collect();
    let mut handles = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let jobs: Vec<(usize, ProbeJob)> = cells
            .iter()
            .enumerate()
            .filter(|(_, c)| c.4 == protocol)
            .filter_map(|(i, (from, to, family, port, _))| {
                let src = by_key.get(from)?;
                let dst = by_key.get(to)?.ip(*family)?;
                src.ip(*family)?;
                Some((
                    i,
                    ProbeJob {
                        from: from.clone(),
                        netns: src.netns.clone(),
                        to: to.clone(),
                        dst: SocketAddr::new(dst, *port),
                    },
                ))
            })
            .collect();
        handles.push(tokio::task::spawn_blocking(move || {
            let plain: Vec<ProbeJob> = jobs.iter().map(|(_, j)| j.clone()).collect();
            let results = run_probes(&plain, protocol, timeout, plain.len().max(1));
            jobs.into_iter()
                .map(|(i, _)| i)
                .zip(results.into_iter().map(|r| r.is_ok_and(|o| o.connected)))
                .collect::<Vec<_>>()
        }));
    }
    let mut out = vec![false; cells.len()];
    for h in handles {
        for (i, connected) in h.await.expect("probe task") {
            out[i] = connected;
        }
    }
    out
}

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Scenario name.
    pub name: String,
    /// Wall time from applying to the last probe.
    pub duration: Duration,
    /// Time until the policies were enforced everywhere.
    pub enforced_after: Duration,
    /// Probes run.
    pub probes: usize,
    /// Expected vs observed, when they differ.
    pub failure: Option<String>,
}

/// Waits until enforced, probes every table (every port and protocol in
/// every family of the lab) and compares it with the model. A cell that
/// should connect and did not is probed once more with a longer timeout
/// (a lost SYN, a loaded machine); a cell that connected where the model
/// says blocked is never retried: that is a leak.
pub async fn check(lab: &Lab, name: &str, started: Instant) -> Outcome {
    let model = wait_enforced(lab, Duration::from_secs(30)).await;
    let enforced_after = started.elapsed();
    let pods = lab.pods().expect("lab pods");
    let families = lab_families(lab);
    let keys: Vec<String> = pods.iter().map(PodRecord::key).collect();
    let mut observed = probe_all(&pods, &families, PROBE_TIMEOUT).await;
    let mut probes = keys.len() * keys.len() * PORTS.len() * families.len();
    let expected: BTreeMap<Table, Matrix> = families
        .iter()
        .flat_map(|&f| PORTS.iter().map(move |&(port, proto)| (f, port, proto)))
        .map(|(f, port, proto)| ((f, port, proto), model.expected_in(&keys, f, port, proto)))
        .collect();
    let missing: Vec<Cell> = expected
        .iter()
        .flat_map(|(&(family, port, proto), want)| {
            observed[&(family, port, proto)]
                .mismatches(want)
                .into_iter()
                .filter(|m| m.expected)
                .map(move |m| (m.from, m.to, family, port, proto))
        })
        .collect();
    if !missing.is_empty() {
        probes += missing.len();
        let again = reprobe(&pods, &missing, RECHECK_TIMEOUT).await;
        for (cell, connected) in missing.iter().zip(again) {
            if let Some(t) = observed.get_mut(&(cell.2, cell.3, cell.4)) {
                t.set(&cell.0, &cell.1, connected);
            }
        }
    }
    // kubectl canal explain must agree with every probed cell (issue 15).
    let mut report = super::explain::mismatches(&lab.client(), &pods, &observed).await;
    for (key, want) in &expected {
        let have = &observed[key];
        if !have.mismatches(want).is_empty() {
            report.push_str(&format!(
                "--- {} {} {}:\n{}\n",
                key.0,
                key.1,
                key.2,
                Matrix::report(want, have)
            ));
        }
    }
    Outcome {
        name: name.to_string(),
        duration: started.elapsed(),
        enforced_after,
        probes,
        failure: (!report.is_empty()).then(|| {
            format!(
                "{report}policies:\n{}",
                model
                    .policies
                    .iter()
                    .map(|p| serde_yaml::to_string(&p.spec).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("---\n")
            )
        }),
    }
}

/// The address a node's host processes use towards other nodes' pods in
/// `family`: its pod subnet's network address of that family (on the
/// family's VXLAN device, `flannel.1` or `flannel-v6.1`).
pub async fn host_address(client: &kube::Client, node: &str, family: Family) -> IpAddr {
    let n = Api::<Node>::all(client.clone()).get(node).await.unwrap();
    let spec = n.spec.unwrap_or_default();
    spec.pod_cidrs
        .into_iter()
        .flatten()
        .chain(spec.pod_cidr)
        .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
        .map(|c| c.network())
        .find(|ip| Family::of(ip) == family)
        .unwrap_or_else(|| panic!("{node} has no {family} podCIDR"))
}

/// The prefix length of a single address of `family` (32 or 128).
pub fn host_prefix(family: Family) -> u8 {
    match family {
        Family::V4 => 32,
        Family::V6 => 128,
    }
}

/// Probes every pod from every node's host namespace (a hostNetwork pod's
/// view) on `port`/`protocol` in `family` and compares with the model;
/// returns the report of differences.
pub async fn check_host_sources(
    lab: &Lab,
    model: &Cluster,
    family: Family,
    port: u16,
    protocol: Protocol,
) -> Option<String> {
    let pods = lab.pods().expect("lab pods");
    let nodes = lab.nodes().expect("lab nodes");
    let mut rows = Vec::new();
    let mut jobs = Vec::new();
    for node in &nodes {
        let ip = host_address(&lab.client(), &node.name, family).await;
        rows.push((node.name.clone(), ip));
        for to in &pods {
            jobs.push(ProbeJob {
                from: format!("host/{}", node.name),
                netns: node.netns.clone(),
                to: to.key(),
                dst: SocketAddr::new(to.ip(family).expect("pod address of the family"), port),
            });
        }
    }
    let results = {
        let jobs = jobs.clone();
        tokio::task::spawn_blocking(move || run_probes(&jobs, protocol, PROBE_TIMEOUT, jobs.len()))
            .await
            .expect("host probes")
    };
    let mut labels: Vec<String> = rows.iter().map(|(n, _)| format!("host/{n}")).collect();
    labels.extend(pods.iter().map(PodRecord::key));
    let mut want = Matrix::filled(labels.clone(), false);
    let mut have = Matrix::filled(labels, false);
    for (node, ip) in &rows {
        for to in &pods {
            let dst = model.pod(&to.key()).expect("pod in model");
            let src = Source::Host { node, ip: *ip };
            want.set(
                &format!("host/{node}"),
                &to.key(),
                model.allowed(&src, dst, family, port, protocol),
            );
        }
    }
    for (job, r) in jobs.iter().zip(results) {
        have.set(&job.from, &job.to, r.is_ok_and(|o| o.connected));
    }
    // Only the host rows were probed; compare those.
    let bad: Vec<String> = have
        .mismatches(&want)
        .into_iter()
        .filter(|m| m.from.starts_with("host/"))
        .map(|m| {
            format!(
                "  {} -> {} {port}/{protocol} over {family}: expected {}, observed {:?}",
                m.from, m.to, m.expected, m.observed
            )
        })
        .collect();
    (!bad.is_empty()).then(|| bad.join("\n"))
}

/// Waits until `f` holds for every prober.
pub async fn wait_probers(
    what: &str,
    probers: &[&Prober],
    timeout: Duration,
    f: impl Fn(&Prober) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let pending: Vec<&str> = probers
            .iter()
            .filter(|p| !f(p))
            .map(|p| p.label.as_str())
            .collect();
        if pending.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("{what} within {timeout:?}: still waiting for {pending:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The CanalNetwork's policy summary: (policyEnforcement, enforced, nodes).
pub async fn policy_summary(client: &kube::Client) -> (Option<String>, Option<u32>, Option<u32>) {
    let n = Api::<canal_crds::CanalNetwork>::all(client.clone())
        .get(canal_crds::DEFAULT_NETWORK_NAME)
        .await
        .expect("CanalNetwork default");
    let s = n.status.unwrap_or_default();
    (
        s.policy_enforcement,
        s.policy_enforced_nodes,
        s.policy_nodes,
    )
}
