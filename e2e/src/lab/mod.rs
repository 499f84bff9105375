//! The lab: one machine, real parts (see DESIGN.md, "The lab").
//!
//! `up` builds, in this order: a control plane (etcd + kube-apiserver on the
//! root namespace's loopback, detached), the CRDs and the CanalNetwork
//! `default`; an underlay namespace holding a bridge; an "internet"
//! namespace on it (every node's default gateway, and the host
//! [`names::INTERNET_HOST`] outside the cluster, with an echo server); one
//! namespace per node with `eth0` on the bridge and a Node object registered
//! as a kubelet would; the API forwarder that makes the API server reachable
//! at `127.0.0.1:6443` inside every node namespace; canal-controller in the
//! root namespace; and per node `canal-cni install` and a canal-agent inside
//! the node's namespace. It returns when every node is programmed.
//!
//! Every command works from the state directory alone; [`Lab`] is the same
//! for tests, with `Drop` running `down`.

pub mod cleanup;
pub mod cni;
pub mod echo;
pub mod forward;
pub mod kernel;
pub mod matrix;
pub mod names;
pub mod netns;
pub mod nodes;
pub mod pods;
pub mod probe;
pub mod protocol;
pub mod state;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use canal_crds::{CanalNetwork, CanalNetworkSpec};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, ListParams};

pub use cleanup::Removed;
pub use matrix::Matrix;
pub use names::LabNames;
pub use pods::PodOptions;
pub use probe::{DfOutcome, EchoStream, ProbeOutcome};
pub use protocol::Protocol;
pub use state::{DEFAULT_STATE_DIR, LabRecord, NodeRecord, PodPort, PodRecord, StateDir};

use crate::binaries::Binaries;
use crate::control_plane;
use crate::{Error, install, process};

/// Namespaces of the NetworkPolicy conformance model.
pub const CONFORMANCE_NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// Pods in each conformance namespace.
pub const CONFORMANCE_PODS: [&str; 3] = ["a", "b", "c"];

/// The pod network the lab's CanalNetwork uses.
pub const LAB_CLUSTER_CIDR: &str = "10.244.0.0/16";
/// How long `up` and `node add` wait for the network to be programmed.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Default probe timeout.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(2000);

/// The current time as the API server writes it.
pub(crate) fn now() -> serde_json::Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap_or_default()
}

/// Where canal's binaries are: `$CANAL_BIN_DIR`, else the directory of the
/// running executable (its parent for a test binary in `target/*/deps`).
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CANAL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of nodes (`node-1` ... `node-N`).
    pub nodes: u32,
    /// Run canal-agent and install canal-cni on every node.
    pub agents: bool,
    /// Run canal-controller.
    pub controller: bool,
    /// Where canal's binaries are (default: [`default_bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for every node to be programmed.
    pub ready_timeout: Duration,
    /// Remove a lab already in the state directory first (tests re-run
    /// after a crash); otherwise `up` refuses.
    pub replace: bool,
}

impl Default for UpOptions {
    fn default() -> UpOptions {
        UpOptions {
            nodes: 3,
            agents: true,
            controller: true,
            bin_dir: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            replace: false,
        }
    }
}

/// A running lab: its record, names and an admin client.
#[derive(Clone)]
pub struct Context {
    /// The state directory.
    pub state: StateDir,
    /// What `up` recorded.
    pub lab: LabRecord,
    /// Names and addresses.
    pub names: LabNames,
    /// Admin client.
    pub client: Client,
}

impl Context {
    /// Opens the lab in `state`.
    pub async fn open(state: &StateDir) -> Result<Context, Error> {
        let lab = state.load()?;
        let client = control_plane::client_from_kubeconfig(&state.kubeconfig()).await?;
        Ok(Context {
            names: state.names(),
            state: state.clone(),
            lab,
            client,
        })
    }
}

fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Io("finding a free port".into(), e))
}

fn check_binaries(dir: &Path, opts: &UpOptions) -> Result<(), Error> {
    let mut wanted = vec!["canal-lab"];
    if opts.controller {
        wanted.push("canal-controller");
    }
    if opts.agents {
        wanted.extend(["canal-agent", "canal-cni"]);
    }
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Lab(format!(
            "{} not found in {} (run `cargo build --workspace --bins`, or set CANAL_BIN_DIR)",
            missing.join(", "),
            dir.display()
        )))
    }
}

/// Brings a lab up in `state`; on any failure removes what it made.
pub async fn up(state: &StateDir, opts: &UpOptions) -> Result<Context, Error> {
    if state.lab_file().exists() && !opts.replace {
        return Err(Error::Lab(format!(
            "a lab is already up in {} (run `canal-lab down --state-dir {}` first)",
            state.dir.display(),
            state.dir.display()
        )));
    }
    // Leftovers of a lab that crashed (processes, namespaces, files).
    cleanup::down(state);
    let bin_dir = opts.bin_dir.clone().unwrap_or_else(default_bin_dir);
    check_binaries(&bin_dir, opts)?;
    Binaries::ensure()?;
    std::fs::create_dir_all(&state.dir)
        .map_err(|e| Error::Io(format!("creating {}", state.dir.display()), e))?;
    match up_steps(state, opts, bin_dir).await {
        Ok(ctx) => Ok(ctx),
        Err(e) => {
            cleanup::down(state);
            Err(e)
        }
    }
}

async fn up_steps(state: &StateDir, opts: &UpOptions, bin_dir: PathBuf) -> Result<Context, Error> {
    let (cp, client) = control_plane::start_detached(&state.control_plane()).await?;
    std::fs::copy(cp.layout.kubeconfig(), state.kubeconfig())
        .map_err(|e| Error::Io(format!("writing {}", state.kubeconfig().display()), e))?;
    install::install_crds(&client).await?;
    install::apply_default_network(
        &client,
        CanalNetworkSpec::with_cluster_cidr(LAB_CLUSTER_CIDR),
    )
    .await?;

    let names = state.names();
    let mut ctx = Context {
        state: state.clone(),
        lab: LabRecord {
            prefix: names.prefix.clone(),
            server: cp.server.clone(),
            underlay: names.underlay(),
            agents: opts.agents,
            controller: opts.controller,
            bin_dir,
            controller_metrics: None,
            started_at: 0,
        },
        names,
        client,
    };
    state::write_json(&state.lab_file(), &ctx.lab)?;

    nodes::build_underlay(&ctx.names)?;
    nodes::start_internet_echo(&ctx).await?;
    for i in 1..=opts.nodes {
        let node = nodes::plan_node(state, &ctx.names, &names::default_node_name(i))?;
        create_node(&ctx, &node).await?;
    }
    // Always: agents run by hand (`ip netns exec`) use it too.
    start_forwarder(&ctx)?;
    for node in state.nodes()? {
        forward::wait_listening(&node.netns, names::NODE_API_PORT, Duration::from_secs(15))?;
    }
    if opts.controller {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        nodes::start_controller(state, &ctx.lab.bin_dir, metrics)?;
        ctx.lab.controller_metrics = Some(metrics);
        state::write_json(&state.lab_file(), &ctx.lab)?;
    }
    if opts.agents {
        for node in state.nodes()? {
            start_node_agent(&ctx, &node)?;
        }
    }
    wait_programmed(&ctx, opts.ready_timeout).await?;
    ctx.lab.started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    state::write_json(&state.lab_file(), &ctx.lab)?;
    Ok(ctx)
}

/// Builds a node's namespace, records it and registers its Node object.
async fn create_node(ctx: &Context, node: &NodeRecord) -> Result<(), Error> {
    nodes::build_node(&ctx.names, node)?;
    nodes::write_kubeconfig(&ctx.state, node)?;
    state::write_json(&ctx.state.node(&node.name).record(), node)?;
    nodes::register(&ctx.client, node).await
}

fn start_forwarder(ctx: &Context) -> Result<(), Error> {
    let mut cmd = std::process::Command::new(ctx.lab.bin_dir.join("canal-lab"));
    cmd.arg("--state-dir")
        .arg(&ctx.state.dir)
        .arg("__forward")
        .arg("--upstream")
        .arg(format!("127.0.0.1:{}", ctx.lab.api_port()?))
        .arg("--port")
        .arg(names::NODE_API_PORT.to_string());
    process::spawn_detached(
        "API forwarder",
        cmd,
        &ctx.state.log("forwarder"),
        &ctx.state.pid_file("forwarder"),
    )?;
    Ok(())
}

/// Installs canal-cni on the node and starts its agent.
fn start_node_agent(ctx: &Context, node: &NodeRecord) -> Result<(), Error> {
    nodes::install_cni(&ctx.lab, &ctx.state, node)?;
    nodes::start_agent(&ctx.lab, &ctx.state, node)?;
    Ok(())
}

/// What is not ready yet; an error when something died.
async fn not_ready(ctx: &Context) -> Result<Vec<String>, Error> {
    let mut problems = Vec::new();
    let records = ctx.state.nodes()?;
    let api: Api<Node> = Api::all(ctx.client.clone());
    let objects = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::Kube("listing Nodes".into(), e))?;
    let cidrs: BTreeMap<String, Option<Ipv4Net>> = objects
        .items
        .iter()
        .map(|n| {
            let cidr = n
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .and_then(|c| c.parse().ok());
            (n.metadata.name.clone().unwrap_or_default(), cidr)
        })
        .collect();
    let views: Vec<kernel::NodeView> = records
        .iter()
        .map(|r| kernel::NodeView {
            name: r.name.clone(),
            pod_cidr: cidrs.get(&r.name).copied().flatten(),
        })
        .collect();

    if ctx.lab.controller {
        if let Some(metrics) = ctx.lab.controller_metrics
            && process::live_pid(&ctx.state.pid_file("controller"), "canal-controller").is_none()
        {
            return Err(Error::Exited {
                name: format!("canal-controller (metrics {metrics})"),
                status: "exited".into(),
                log_tail: process::tail(&ctx.state.log("controller"), 30),
            });
        }
        let networks: Api<CanalNetwork> = Api::all(ctx.client.clone());
        let net = networks
            .get(canal_crds::DEFAULT_NETWORK_NAME)
            .await
            .map_err(|e| Error::Kube("reading CanalNetwork default".into(), e))?;
        let ready = net.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if !ready {
            problems.push("CanalNetwork default is not Ready".to_string());
        }
        problems.extend(
            views
                .iter()
                .filter(|v| v.pod_cidr.is_none())
                .map(|v| format!("{} has no podCIDR yet", v.name)),
        );
    }
    if ctx.lab.agents {
        let mut routes = BTreeMap::new();
        for node in &records {
            let agent = ctx.state.node(&node.name).agent();
            if !nodes::agent_running(&ctx.state, &node.name) {
                return Err(Error::Exited {
                    name: format!("canal-agent on {}", node.name),
                    status: "exited".into(),
                    log_tail: process::tail(&agent.log(), 30),
                });
            }
            match nodes::http_get(Some(&node.netns), names::AGENT_METRICS_PORT, "/readyz") {
                Ok(resp) if kernel::http_ok(&resp) => {}
                Ok(resp) => problems.push(format!(
                    "{}: agent /readyz says {:?}",
                    node.name,
                    resp.lines().next().unwrap_or_default()
                )),
                Err(e) => problems.push(format!("{}: agent /readyz: {e}", node.name)),
            }
            routes.insert(node.name.clone(), kernel::snapshot(&node.netns)?.routes);
        }
        let mut missing = kernel::missing_routes(&views, &routes);
        if ctx.lab.controller {
            // Already reported above.
            missing.retain(|m| !m.ends_with("has no podCIDR yet"));
        }
        problems.extend(missing);
    }
    Ok(problems)
}

/// Waits until the lab is programmed: with the controller, every Node has a
/// podCIDR and the CanalNetwork is Ready; with agents, every agent answers
/// /readyz (from inside its namespace) and every node has a route to every
/// other node's subnet. On timeout the error lists what is not ready.
pub async fn wait_programmed(ctx: &Context, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let problems = not_ready(ctx).await?;
        if problems.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "the lab to be programmed after {}s; not ready:\n  - {}",
                timeout.as_secs(),
                problems.join("\n  - ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops and removes everything the lab in `state` made.
pub fn down(state: &StateDir) -> Removed {
    cleanup::down(state)
}

/// A node added to a running lab.
#[derive(Debug, Clone)]
pub struct NodeAdded {
    /// The node.
    pub node: NodeRecord,
    /// From the Node object's creation until every other node had a route
    /// to its subnet (None without agents).
    pub routes_everywhere_after: Option<Duration>,
    /// From the Node object's creation until the whole lab was programmed.
    pub programmed_after: Duration,
}

/// Adds a node to a running lab and waits until it is programmed.
pub async fn add_node(ctx: &Context, name: &str, timeout: Duration) -> Result<NodeAdded, Error> {
    let node = {
        let _lock = ctx.state.lock()?;
        let node = nodes::plan_node(&ctx.state, &ctx.names, name)?;
        // Record first so a failure below is undone by `del_node`/`down`.
        state::write_json(&ctx.state.node(&node.name).record(), &node)?;
        node
    };
    match add_node_steps(ctx, &node, timeout).await {
        Ok(added) => Ok(added),
        Err(e) => {
            let _ = del_node(ctx, &node.name).await;
            Err(e)
        }
    }
}

async fn add_node_steps(
    ctx: &Context,
    node: &NodeRecord,
    timeout: Duration,
) -> Result<NodeAdded, Error> {
    nodes::build_node(&ctx.names, node)?;
    nodes::write_kubeconfig(&ctx.state, node)?;
    let created = Instant::now();
    nodes::register(&ctx.client, node).await?;
    let deadline = created + timeout;
    forward::wait_listening(&node.netns, names::NODE_API_PORT, Duration::from_secs(15))?;
    let mut routes_everywhere_after = None;
    if ctx.lab.agents {
        start_node_agent(ctx, node)?;
        routes_everywhere_after = Some(wait_routes_to(ctx, node, deadline).await? - created);
    }
    wait_programmed(ctx, deadline.saturating_duration_since(Instant::now())).await?;
    Ok(NodeAdded {
        node: node.clone(),
        routes_everywhere_after,
        programmed_after: created.elapsed(),
    })
}

/// Waits until every other node has a route to `node`'s subnet; returns when.
async fn wait_routes_to(
    ctx: &Context,
    node: &NodeRecord,
    deadline: Instant,
) -> Result<Instant, Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    loop {
        let cidr: Option<Ipv4Net> = api
            .get_opt(&node.name)
            .await
            .map_err(|e| Error::Kube(format!("reading Node {}", node.name), e))?
            .and_then(|n| n.spec)
            .and_then(|s| s.pod_cidr)
            .and_then(|c| c.parse().ok());
        let mut waiting = vec![];
        match cidr {
            None => waiting.push(format!("{} has no podCIDR yet", node.name)),
            Some(cidr) => {
                for other in ctx.state.nodes()?.iter().filter(|o| o.name != node.name) {
                    if kernel::snapshot(&other.netns)?.route_to(cidr).is_none() {
                        waiting.push(format!("{} has no route to {cidr}", other.name));
                    }
                }
            }
        }
        if waiting.is_empty() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "routes to the new node {}:\n  - {}",
                node.name,
                waiting.join("\n  - ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes a node: its pods (CNI DEL), its agent, its Node object, its
/// namespace and files.
pub async fn del_node(ctx: &Context, name: &str) -> Result<(), Error> {
    let node = ctx.state.load_node(name)?;
    pods::del_on_node(ctx, name).await?;
    nodes::stop_agent(&ctx.state, name, Duration::from_secs(5));
    let _lock = ctx.state.lock()?;
    // The forwarder drops its listener once the record is gone.
    let _ = std::fs::remove_file(ctx.state.node(name).record());
    nodes::unregister(&ctx.client, name).await?;
    nodes::remove_node_network(&ctx.names, &node)?;
    let _ = std::fs::remove_dir_all(&ctx.state.node(name).dir);
    Ok(())
}

/// A probe's destination.
#[derive(Debug, Clone)]
pub enum Target {
    /// A lab pod, `namespace/name`.
    Pod(String),
    /// The internet host ([`names::INTERNET_HOST`]).
    Internet,
    /// Any address.
    Address(IpAddr),
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target, Error> {
        if s == "internet" {
            return Ok(Target::Internet);
        }
        if let Ok(ip) = s.parse() {
            return Ok(Target::Address(ip));
        }
        pods::parse_key(s)?;
        Ok(Target::Pod(s.to_string()))
    }
}

/// The address of a probe target.
pub fn target_ip(ctx: &Context, target: &Target) -> Result<IpAddr, Error> {
    match target {
        Target::Internet => Ok(IpAddr::V4(names::INTERNET_HOST)),
        Target::Address(ip) => Ok(*ip),
        Target::Pod(key) => {
            let (ns, name) = pods::parse_key(key)?;
            let pod = ctx.state.load_pod(&ns, &name)?;
            pod.ipv4()
                .map(IpAddr::V4)
                .ok_or_else(|| Error::Lab(format!("pod {key} has no IPv4 address")))
        }
    }
}

/// Probes `target` from the pod `from` (`namespace/name`).
pub async fn probe(
    ctx: &Context,
    from: &str,
    target: &Target,
    port: u16,
    protocol: Protocol,
    timeout: Duration,
) -> Result<ProbeOutcome, Error> {
    let (ns, name) = pods::parse_key(from)?;
    let source = ctx.state.load_pod(&ns, &name)?;
    let dst = SocketAddr::new(target_ip(ctx, target)?, port);
    tokio::task::spawn_blocking(move || probe::probe_in(&source.netns, dst, protocol, timeout))
        .await
        .map_err(|e| Error::Lab(format!("probe task: {e}")))?
}

/// What `matrix` probes.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    /// Destination port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// Probes in flight.
    pub concurrency: usize,
}

impl Default for MatrixOptions {
    fn default() -> MatrixOptions {
        MatrixOptions {
            port: 80,
            protocol: Protocol::Tcp,
            timeout: DEFAULT_PROBE_TIMEOUT,
            concurrency: matrix::DEFAULT_CONCURRENCY,
        }
    }
}

/// A probed truth table and each cell's outcome.
#[derive(Debug, Clone)]
pub struct MatrixRun {
    /// The table.
    pub matrix: Matrix,
    /// Every probe's outcome, by (from, to).
    pub outcomes: BTreeMap<(String, String), ProbeOutcome>,
}

/// Probes every pod pair (self included) in parallel.
pub async fn run_matrix(ctx: &Context, opts: &MatrixOptions) -> Result<MatrixRun, Error> {
    let pods = ctx.state.pods()?;
    let mut jobs = Vec::new();
    for from in &pods {
        for to in &pods {
            let ip = to
                .ipv4()
                .ok_or_else(|| Error::Lab(format!("pod {} has no IPv4 address", to.key())))?;
            jobs.push(matrix::ProbeJob {
                from: from.key(),
                netns: from.netns.clone(),
                to: to.key(),
                dst: SocketAddr::from((ip, opts.port)),
            });
        }
    }
    let (protocol, timeout, concurrency) = (opts.protocol, opts.timeout, opts.concurrency);
    let (jobs, results) = tokio::task::spawn_blocking(move || {
        let results = matrix::run_probes(&jobs, protocol, timeout, concurrency);
        (jobs, results)
    })
    .await
    .map_err(|e| Error::Lab(format!("matrix task: {e}")))?;
    let mut table = Matrix::filled(pods.iter().map(PodRecord::key), false);
    let mut outcomes = BTreeMap::new();
    for (job, result) in jobs.into_iter().zip(results) {
        let outcome = result?;
        table.set(&job.from, &job.to, outcome.connected);
        outcomes.insert((job.from, job.to), outcome);
    }
    Ok(MatrixRun {
        matrix: table,
        outcomes,
    })
}

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
    line(
        true,
        format!(
            "prefix {}, underlay {} (gateway {}), internet host {}",
            ctx.lab.prefix,
            ctx.lab.underlay,
            ctx.names.gateway(),
            names::INTERNET_HOST
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
    let api: Api<Node> = Api::all(ctx.client.clone());
    for node in ctx.state.nodes()? {
        let cidr = api
            .get_opt(&node.name)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.spec)
            .and_then(|s| s.pod_cidr)
            .unwrap_or_else(|| "no podCIDR".into());
        let mut ok = netns::exists(&node.netns);
        let mut text = format!(
            "node {} {} {} netns {}",
            node.name, node.address, cidr, node.netns
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

/// `kubectl` with the lab's kubeconfig.
pub fn kubectl(state: &StateDir) -> Result<std::process::Command, Error> {
    let bins = Binaries::ensure()?;
    let mut cmd = std::process::Command::new(bins.kubectl);
    cmd.env("KUBECONFIG", state.kubeconfig());
    Ok(cmd)
}

/// A lab owned by a test: everything the CLI does, as methods, and `down`
/// when dropped (also when the test panics).
pub struct Lab {
    ctx: Context,
    owned: bool,
}

impl Lab {
    /// A state directory for the test `name`: stable across runs (a re-run
    /// removes what a crashed run left) and distinct per checkout (two
    /// worktrees on one machine never share a lab).
    pub fn test_state_dir(name: &str) -> PathBuf {
        let checkout = names::LabNames::for_state_dir(Path::new(env!("CARGO_MANIFEST_DIR")));
        std::env::temp_dir().join(format!("canal-e2e-{}-{name}", &checkout.prefix[2..]))
    }

    /// Brings a lab up in `state_dir`, replacing whatever a previous run
    /// left there.
    pub async fn up(state_dir: impl Into<PathBuf>, opts: UpOptions) -> Result<Lab, Error> {
        let state = StateDir::new(state_dir);
        let ctx = up(
            &state,
            &UpOptions {
                replace: true,
                ..opts
            },
        )
        .await?;
        Ok(Lab { ctx, owned: true })
    }

    /// Attaches to a lab someone else brought up (not taken down on drop).
    pub async fn open(state_dir: impl Into<PathBuf>) -> Result<Lab, Error> {
        let ctx = Context::open(&StateDir::new(state_dir)).await?;
        Ok(Lab { ctx, owned: false })
    }

    /// Leaves the lab running when this handle is dropped.
    pub fn detach(mut self) -> Context {
        self.owned = false;
        self.ctx.clone()
    }

    /// Takes the lab down now and reports what was removed.
    pub fn down(mut self) -> Removed {
        self.owned = false;
        cleanup::down(&self.ctx.state)
    }

    /// The lab's context (state, record, names, client).
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// An admin client.
    pub fn client(&self) -> Client {
        self.ctx.client.clone()
    }

    /// The state directory.
    pub fn state(&self) -> &StateDir {
        &self.ctx.state
    }

    /// Names and addresses.
    pub fn names(&self) -> &LabNames {
        &self.ctx.names
    }

    /// `kubectl` with the lab's kubeconfig.
    pub fn kubectl(&self) -> Result<std::process::Command, Error> {
        kubectl(&self.ctx.state)
    }

    /// The nodes, by slot.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        self.ctx.state.nodes()
    }

    /// One node.
    pub fn node(&self, name: &str) -> Result<NodeRecord, Error> {
        self.ctx.state.load_node(name)
    }

    /// The pods.
    pub fn pods(&self) -> Result<Vec<PodRecord>, Error> {
        self.ctx.state.pods()
    }

    /// One pod (`namespace/name`).
    pub fn pod(&self, key: &str) -> Result<PodRecord, Error> {
        let (ns, name) = pods::parse_key(key)?;
        self.ctx.state.load_pod(&ns, &name)
    }

    /// Adds a pod and waits until it serves.
    pub async fn add_pod(&self, opts: PodOptions) -> Result<PodRecord, Error> {
        pods::add(&self.ctx, opts).await
    }

    /// Adds several pods concurrently.
    pub async fn add_pods(&self, all: Vec<PodOptions>) -> Result<Vec<PodRecord>, Error> {
        futures::future::try_join_all(all.into_iter().map(|o| pods::add(&self.ctx, o))).await
    }

    /// The upstream NetworkPolicy e2e model: namespaces `x`, `y`, `z`
    /// (label `ns=<name>`), pods `a`, `b`, `c` in each (label `pod=<name>`)
    /// serving TCP and UDP 80 and 81 with the `serve-*` port names, spread
    /// round-robin over the nodes (x/a on the first node, x/b on the second,
    /// ...). Returns the pods sorted by `namespace/name`.
    pub async fn add_conformance_pods(&self) -> Result<Vec<PodRecord>, Error> {
        let nodes = self.nodes()?;
        if nodes.is_empty() {
            return Err(Error::Lab("the lab has no nodes".into()));
        }
        let mut specs = Vec::new();
        for (i, (ns, pod)) in CONFORMANCE_NAMESPACES
            .iter()
            .flat_map(|ns| CONFORMANCE_PODS.iter().map(move |p| (*ns, *p)))
            .enumerate()
        {
            specs.push(PodOptions::new(ns, pod, &nodes[i % nodes.len()].name).label("pod", pod));
        }
        for ns in CONFORMANCE_NAMESPACES {
            self.namespace(ns, &[("ns", ns)]).await?;
        }
        let mut pods = self.add_pods(specs).await?;
        pods.sort_by_key(PodRecord::key);
        Ok(pods)
    }

    /// Deletes a pod (`namespace/name`).
    pub async fn del_pod(&self, key: &str) -> Result<(), Error> {
        let (ns, name) = pods::parse_key(key)?;
        pods::del(&self.ctx, &ns, &name).await
    }

    /// Creates a namespace (or adds labels to it).
    pub async fn namespace(&self, name: &str, labels: &[(&str, &str)]) -> Result<(), Error> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        pods::ensure_namespace_with(&self.ctx, name, &labels).await
    }

    /// Adds a node and waits until it is programmed.
    pub async fn add_node(&self, name: &str) -> Result<NodeAdded, Error> {
        add_node(&self.ctx, name, DEFAULT_READY_TIMEOUT).await
    }

    /// Removes a node.
    pub async fn del_node(&self, name: &str) -> Result<(), Error> {
        del_node(&self.ctx, name).await
    }

    /// Waits until the lab is programmed.
    pub async fn wait_programmed(&self, timeout: Duration) -> Result<(), Error> {
        wait_programmed(&self.ctx, timeout).await
    }

    /// Probes `to` (a pod `namespace/name`, `internet`, or an address) from
    /// the pod `from`.
    pub async fn probe(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
    ) -> Result<ProbeOutcome, Error> {
        let target: Target = to.parse()?;
        probe(
            &self.ctx,
            from,
            &target,
            port,
            protocol,
            DEFAULT_PROBE_TIMEOUT,
        )
        .await
    }

    /// Probes `to` from `from` with a timeout of its own.
    pub async fn probe_with_timeout(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
        timeout: Duration,
    ) -> Result<ProbeOutcome, Error> {
        let target: Target = to.parse()?;
        probe(&self.ctx, from, &target, port, protocol, timeout).await
    }

    /// Probes every pod pair with the given options.
    pub async fn matrix_with(&self, opts: &MatrixOptions) -> Result<MatrixRun, Error> {
        run_matrix(&self.ctx, opts).await
    }

    /// Probes every pod pair.
    pub async fn matrix(&self, port: u16, protocol: Protocol) -> Result<MatrixRun, Error> {
        run_matrix(
            &self.ctx,
            &MatrixOptions {
                port,
                protocol,
                ..MatrixOptions::default()
            },
        )
        .await
    }

    /// Sends a UDP datagram of `payload` bytes with DF set from pod `from`
    /// to the echo server of `to` on `port`.
    pub async fn udp_df(
        &self,
        from: &str,
        to: &str,
        port: u16,
        payload: usize,
    ) -> Result<DfOutcome, Error> {
        let source = self.pod(from)?;
        let dst = SocketAddr::new(target_ip(&self.ctx, &to.parse()?)?, port);
        tokio::task::spawn_blocking(move || {
            probe::udp_df_in(&source.netns, dst, payload, Duration::from_secs(3))
        })
        .await
        .map_err(|e| Error::Lab(format!("DF probe task: {e}")))?
    }

    /// Opens a long-running echo stream from pod `from` to `to` on `port`.
    pub async fn open_stream(&self, from: &str, to: &str, port: u16) -> Result<EchoStream, Error> {
        let source = self.pod(from)?;
        let dst = SocketAddr::new(target_ip(&self.ctx, &to.parse()?)?, port);
        tokio::task::spawn_blocking(move || {
            probe::open_stream_in(&source.netns, dst, Duration::from_secs(5))
        })
        .await
        .map_err(|e| Error::Lab(format!("stream task: {e}")))?
    }

    /// A node's routes, neighbours and FDB.
    pub fn kernel(&self, node: &str) -> Result<kernel::Snapshot, Error> {
        kernel::snapshot(&self.node(node)?.netns)
    }

    /// `ip netns exec <node namespace> <program>`.
    pub fn exec_on_node(&self, node: &str, program: &str) -> Result<std::process::Command, Error> {
        Ok(netns::exec(&self.node(node)?.netns, program))
    }

    /// Stops a node's agent (SIGTERM, 5 s grace).
    pub fn stop_agent(&self, node: &str) -> bool {
        nodes::stop_agent(&self.ctx.state, node, Duration::from_secs(5))
    }

    /// Starts a node's agent again.
    pub fn start_agent(&self, node: &str) -> Result<(), Error> {
        nodes::start_agent(&self.ctx.lab, &self.ctx.state, &self.node(node)?).map(|_| ())
    }

    /// Stops canal-controller (SIGTERM, 5 s grace); false when it was not running.
    pub fn stop_controller(&self) -> bool {
        process::stop_pid_file(
            &self.ctx.state.pid_file("controller"),
            "canal-controller",
            Duration::from_secs(5),
        )
    }

    /// Starts canal-controller again on its metrics address.
    pub fn start_controller(&self) -> Result<(), Error> {
        let metrics = self
            .ctx
            .lab
            .controller_metrics
            .ok_or_else(|| Error::Lab("this lab runs without the controller".into()))?;
        nodes::start_controller(&self.ctx.state, &self.ctx.lab.bin_dir, metrics).map(|_| ())
    }

    /// The agent's log so far.
    pub fn agent_log(&self, node: &str) -> String {
        process::tail(&self.ctx.state.node(node).agent().log(), 10_000)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            let removed = cleanup::down(&self.ctx.state);
            if !removed.failures.is_empty() {
                eprintln!("canal-lab down left: {:?}", removed.failures);
            }
        }
    }
}
