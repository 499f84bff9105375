//! `up`, `down`, readiness, and nodes joining and leaving a running lab.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use canal_crds::{CanalNetwork, CanalNetworkSpec};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

use crate::binaries::Binaries;
use crate::control_plane;
use crate::lab::report::{self, Component, Problem};
use crate::lab::{
    Context, IpFamily, LAB_CLUSTER_CIDR, LabRecord, NodeRecord, Removed, StateDir, UpOptions,
    cleanup, default_bin_dir, forward, kernel, names, nodes, pods, preflight, state,
};
use crate::{Error, install, process};

/// Progress lines of `up` on stderr, with the time since it began.
struct Progress {
    on: bool,
    started: Instant,
}

impl Progress {
    fn say(&self, what: impl std::fmt::Display) {
        if self.on {
            eprintln!("[{:5.1}s] {what}", self.started.elapsed().as_secs_f64());
        }
    }
}

/// Brings a lab up in `state`. First the preflight (what cannot work fails
/// at once, one line per cause with its fix). On a later failure or
/// timeout it reports every component that is not ready or not running
/// with its log's path and last error lines, stops what it started and
/// keeps the state directory (`down` removes it; the next `up` starts
/// afresh); with `keep_on_failure` everything keeps running for inspection.
pub async fn up(state: &StateDir, opts: &UpOptions) -> Result<Context, Error> {
    let progress = Progress {
        on: opts.progress,
        started: Instant::now(),
    };
    if state.lab_file().exists() && !opts.replace {
        return Err(Error::Lab(format!(
            "a lab is already up in {} (run `canal-lab down --state-dir {}` first)",
            state.dir.display(),
            state.dir.display()
        )));
    }
    let bin_dir = opts.bin_dir.clone().unwrap_or_else(default_bin_dir);
    let failures = preflight::check(&preflight::Needs {
        bin_dir: bin_dir.clone(),
        agents: opts.agents,
        controller: opts.controller,
    });
    if !failures.is_empty() {
        return Err(Error::Preflight(failures));
    }
    // Leftovers of a lab that crashed or failed (processes, namespaces, files).
    cleanup::down(state);
    Binaries::ensure()?;
    std::fs::create_dir_all(&state.dir)
        .map_err(|e| Error::Io(format!("creating {}", state.dir.display()), e))?;
    let mut problems = Vec::new();
    match up_steps(state, opts, bin_dir, &progress, &mut problems).await {
        Ok(ctx) => Ok(ctx),
        Err(e) => Err(failed(state, opts, e, &problems)),
    }
}

/// The error of a failed `up`: the cause and the report, taken before
/// anything is stopped; then stops the lab but keeps its files.
fn failed(state: &StateDir, opts: &UpOptions, cause: Error, problems: &[Problem]) -> Error {
    let mut text = report::render(state, problems);
    if opts.keep_on_failure {
        text.push_str(&format!(
            "Everything keeps running for inspection (--keep-on-failure); `canal-lab down --state-dir {}` removes it.",
            state.dir.display()
        ));
    } else {
        let stopped = cleanup::stop(state);
        // Not a lab any more: `status` says so and the next `up` starts afresh.
        let _ = std::fs::remove_file(state.lab_file());
        text.push_str(&format!(
            "Stopped {} process(es) and removed {} namespace(s); the logs stay in {} (`canal-lab down --state-dir {}` removes them, `up` again starts afresh).",
            stopped.processes.len(),
            stopped.namespaces.len(),
            state.dir.display(),
            state.dir.display()
        ));
    }
    let _ = std::fs::write(state.up_failed_file(), format!("{cause}\n{text}\n"));
    // An exited process's log is in the report already.
    let cause = match cause {
        Error::Exited { name, status, .. } => Error::Lab(format!("{name} exited ({status})")),
        other => other,
    };
    Error::LabFailed {
        cause: Box::new(cause),
        report: text,
    }
}

async fn up_steps(
    state: &StateDir,
    opts: &UpOptions,
    bin_dir: PathBuf,
    progress: &Progress,
    problems: &mut Vec<Problem>,
) -> Result<Context, Error> {
    progress.say("control plane: etcd and kube-apiserver");
    let (cp, client) = control_plane::start_detached(&state.control_plane()).await?;
    progress.say(format!(
        "API server {} ready; CRDs and the CanalNetwork default",
        cp.server
    ));
    std::fs::copy(cp.layout.kubeconfig(), state.kubeconfig())
        .map_err(|e| Error::Io(format!("writing {}", state.kubeconfig().display()), e))?;
    install::install_crds(&client).await?;
    install::apply_default_network(&client, lab_network(opts.ip_family, opts.policy)?).await?;

    let names = state.names();
    let mut ctx = Context {
        state: state.clone(),
        lab: LabRecord {
            prefix: names.prefix.clone(),
            server: cp.server.clone(),
            underlay: names.underlay(),
            ip_family: opts.ip_family,
            underlay6: opts.ip_family.has_v6().then(|| names.underlay6()),
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

    progress.say(format!(
        "network: underlay {}, internet host, {} node(s) (namespaces {}-*)",
        ctx.names.underlay(),
        opts.nodes,
        ctx.names.prefix
    ));
    nodes::build_underlay(&ctx.names, opts.ip_family)?;
    nodes::start_internet_echo(&ctx).await?;
    for i in 1..=opts.nodes {
        let node = nodes::plan_node(
            state,
            &ctx.names,
            opts.ip_family,
            &names::default_node_name(i),
        )?;
        create_node(&ctx, &node).await?;
    }
    // Always: agents run by hand (`ip netns exec`) use it too.
    start_forwarder(&ctx)?;
    for node in state.nodes()? {
        forward::wait_listening(&node.netns, names::NODE_API_PORT, Duration::from_secs(15))?;
    }
    if opts.controller {
        progress.say("canal-controller");
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, crate::ports::free_loopback_port()?));
        nodes::start_controller(state, &ctx.lab.bin_dir, metrics)?;
        ctx.lab.controller_metrics = Some(metrics);
        state::write_json(&state.lab_file(), &ctx.lab)?;
    }
    if opts.agents {
        progress.say(format!(
            "canal-cni and canal-agent on {} node(s)",
            opts.nodes
        ));
        for node in state.nodes()? {
            start_node_agent(&ctx, &node)?;
        }
    }
    progress.say(format!(
        "waiting until every node is programmed (up to {}s)",
        opts.ready_timeout.as_secs()
    ));
    if let Err(not_ready) = wait_ready(&ctx, opts.ready_timeout, Some(progress)).await {
        let error = not_ready.to_error();
        *problems = not_ready.problems;
        return Err(error);
    }
    ctx.lab.started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    state::write_json(&state.lab_file(), &ctx.lab)?;
    Ok(ctx)
}

/// The lab's CanalNetwork: the family's ranges (IPv6 nodes get a /64 each),
/// NetworkPolicy as asked.
pub fn lab_network(family: IpFamily, policy: bool) -> Result<CanalNetworkSpec, Error> {
    // IPv4 labs keep the single clusterCIDR (what they always had); IPv6
    // and dual-stack labs list their ranges, primary first.
    let mut spec = match family {
        IpFamily::Ipv4 => CanalNetworkSpec::with_cluster_cidr(LAB_CLUSTER_CIDR),
        _ => {
            let mut spec = CanalNetworkSpec::with_cluster_cidrs(&family.cluster_cidrs());
            spec.node_subnet_length_v6 = super::family::NODE_SUBNET_LENGTH_V6;
            spec
        }
    };
    spec.policy.enabled = policy;
    Ok(spec)
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

/// What is not ready yet, by component; `exited` when a process died (no
/// point in waiting).
struct Readiness {
    problems: Vec<Problem>,
    exited: bool,
}

/// What is not ready yet.
async fn not_ready(ctx: &Context) -> Result<Readiness, Error> {
    let mut problems = Vec::new();
    let mut exited = false;
    let mut policy_problem = None;
    let records = ctx.state.nodes()?;
    let api: Api<Node> = Api::all(ctx.client.clone());
    let objects = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::Kube("listing Nodes".into(), e))?;
    let cidrs: BTreeMap<String, Vec<IpNet>> = objects
        .items
        .iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                kernel::pod_cidrs(n),
            )
        })
        .collect();
    let views: Vec<kernel::NodeView> = records
        .iter()
        .map(|r| kernel::NodeView {
            name: r.name.clone(),
            pod_cidrs: cidrs.get(&r.name).cloned().unwrap_or_default(),
        })
        .collect();

    if ctx.lab.controller {
        if ctx.lab.controller_metrics.is_some()
            && process::live_pid(&ctx.state.pid_file("controller"), "canal-controller").is_none()
        {
            problems.push(Problem::new(Component::Controller, "exited"));
            exited = true;
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
            problems.push(Problem::new(
                Component::Controller,
                "CanalNetwork default is not Ready",
            ));
        }
        if ctx.lab.agents {
            // NetworkPolicy: every node's agent reports its NodePolicySet
            // enforced (the controller's summary), or policy is disabled.
            let summary = net.status.as_ref().map(|s| {
                (
                    s.policy_enforcement.clone(),
                    s.policy_enforced_nodes,
                    s.policy_nodes,
                )
            });
            let want = records.len() as u32;
            let enforced = match &summary {
                Some((Some(text), _, _)) if text == "disabled" => true,
                Some((_, Some(enforced), Some(nodes))) => *enforced == want && *nodes == want,
                _ => false,
            };
            if !enforced {
                // Attributed once the agents are looked at: theirs when one
                // is not ready, else the controller's (its summary).
                policy_problem = Some(Problem::new(
                    Component::Controller,
                    format!(
                        "NetworkPolicy not enforced on every node yet (CanalNetwork default says {:?})",
                        summary
                            .and_then(|s| s.0)
                            .unwrap_or_else(|| "nothing".into())
                    ),
                ));
            }
        }
        problems.extend(views.iter().filter(|v| v.pod_cidrs.is_empty()).map(|v| {
            Problem::new(
                Component::Controller,
                format!("{} has no podCIDR yet", v.name),
            )
        }));
    }
    if ctx.lab.agents {
        let mut routes = BTreeMap::new();
        for node in &records {
            let agent = Component::Agent(node.name.clone());
            if !nodes::agent_running(&ctx.state, &node.name) {
                problems.push(Problem::new(agent, "exited"));
                exited = true;
                continue;
            }
            match nodes::http_get(Some(&node.netns), names::AGENT_METRICS_PORT, "/readyz") {
                Ok(resp) if kernel::http_ok(&resp) => {}
                Ok(resp) => problems.push(Problem::new(
                    agent,
                    format!(
                        "{}: agent /readyz says {}",
                        node.name,
                        readyz_summary(&resp)
                    ),
                )),
                Err(e) => problems.push(Problem::new(
                    agent,
                    format!("{}: agent /readyz: {e}", node.name),
                )),
            }
            routes.insert(node.name.clone(), kernel::routes(&node.netns)?);
        }
        let mut missing = kernel::missing_routes(&views, &routes);
        if ctx.lab.controller {
            // Already reported above.
            missing.retain(|m| !m.ends_with("has no podCIDR yet"));
        }
        // "<node> has no route to ...": that node's agent programs routes.
        problems.extend(missing.into_iter().map(|m| {
            let node = m.split_whitespace().next().unwrap_or_default().to_string();
            Problem::new(Component::Agent(node), m)
        }));
    }
    if let Some(mut p) = policy_problem {
        if problems
            .iter()
            .any(|q| matches!(q.component, Component::Agent(_)))
        {
            p.component = Component::Lab;
        }
        problems.push(p);
    }
    Ok(Readiness { problems, exited })
}

/// `HTTP/1.1 503 Service Unavailable` and the body (`not ready: waiting for
/// policy`) of a /readyz response, on one line.
fn readyz_summary(resp: &str) -> String {
    let status = resp.lines().next().unwrap_or_default().trim();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .unwrap_or_default();
    if body.is_empty() {
        format!("{status:?}")
    } else {
        format!("{status:?} ({body})")
    }
}

/// Why the lab is not programmed.
struct NotReady {
    problems: Vec<Problem>,
    /// The timeout, or None when a process exited.
    timed_out_after: Option<Duration>,
}

impl NotReady {
    fn to_error(&self) -> Error {
        let list = self
            .problems
            .iter()
            .map(|p| {
                if p.text == "exited" {
                    format!("{} exited", p.component)
                } else {
                    p.text.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n  - ");
        match self.timed_out_after {
            Some(t) => Error::Timeout(format!(
                "the lab to be programmed after {}s; not ready:\n  - {list}",
                t.as_secs()
            )),
            None => Error::Lab(format!("a lab process exited:\n  - {list}")),
        }
    }
}

/// How often a waiting `up` says what it is still waiting for.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(10);

async fn wait_ready(
    ctx: &Context,
    timeout: Duration,
    progress: Option<&Progress>,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + timeout;
    let mut next_note = Instant::now() + STILL_WAITING_EVERY;
    loop {
        let readiness = match not_ready(ctx).await {
            Ok(r) => r,
            // The API server did not answer: worth waiting for unless it
            // is gone.
            Err(e) => {
                let pid_file = crate::control_plane::Layout {
                    dir: ctx.state.control_plane(),
                }
                .pid_file("kube-apiserver");
                let gone = process::live_pid(&pid_file, "kube-apiserver").is_none();
                Readiness {
                    problems: vec![Problem::new(
                        Component::ControlPlane("kube-apiserver"),
                        if gone {
                            "exited".to_string()
                        } else {
                            e.to_string()
                        },
                    )],
                    exited: gone,
                }
            }
        };
        if readiness.problems.is_empty() {
            return Ok(());
        }
        if readiness.exited {
            return Err(NotReady {
                problems: readiness.problems,
                timed_out_after: None,
            });
        }
        if Instant::now() > deadline {
            return Err(NotReady {
                problems: readiness.problems,
                timed_out_after: Some(timeout),
            });
        }
        if let Some(p) = progress
            && Instant::now() >= next_note
        {
            let texts: Vec<&str> = readiness.problems.iter().map(|p| p.text.as_str()).collect();
            p.say(format!("still waiting: {}", texts.join("; ")));
            next_note = Instant::now() + STILL_WAITING_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the lab is programmed: with the controller, every Node has a
/// podCIDR and the CanalNetwork is Ready; with agents, every agent answers
/// /readyz (from inside its namespace) and every node has a route to every
/// other node's subnet; with both, the CanalNetwork reports NetworkPolicy
/// enforced on every node. On timeout the error lists what is not ready;
/// a process that exits fails it at once.
pub async fn wait_programmed(ctx: &Context, timeout: Duration) -> Result<(), Error> {
    wait_ready(ctx, timeout, None)
        .await
        .map_err(|n| Error::LabFailed {
            cause: Box::new(n.to_error()),
            report: report::render(&ctx.state, &n.problems),
        })
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
    /// From the Node object's creation until the controller had given it a
    /// podCIDR and its VTEP annotations (None without agents).
    pub annotated_after: Option<Duration>,
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
        let node = nodes::plan_node(&ctx.state, &ctx.names, ctx.lab.ip_family, name)?;
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
    let (mut annotated_after, mut routes_everywhere_after) = (None, None);
    if ctx.lab.agents {
        // Watch the other nodes while this one's agent is set up (copying a
        // debug canal-cni takes a while), so the figures are the
        // controller's and the agents', not the lab's.
        let setup = {
            let (ctx, node) = (ctx.clone(), node.clone());
            tokio::task::spawn_blocking(move || start_node_agent(&ctx, &node))
        };
        let (setup, programmed) = tokio::join!(setup, wait_routes_to(ctx, node, deadline));
        setup.map_err(|e| Error::Lab(format!("setting up {}'s agent: {e}", node.name)))??;
        let programmed = programmed?;
        annotated_after = Some(programmed.annotated - created);
        routes_everywhere_after = Some(programmed.routed - created);
    }
    wait_programmed(ctx, deadline.saturating_duration_since(Instant::now())).await?;
    Ok(NodeAdded {
        node: node.clone(),
        annotated_after,
        routes_everywhere_after,
        programmed_after: created.elapsed(),
    })
}

/// When the controller had annotated a new node, and when every other node
/// had a route to it.
struct Programmed {
    annotated: Instant,
    routed: Instant,
}

/// Waits until every other node has a route to `node`'s subnet.
async fn wait_routes_to(
    ctx: &Context,
    node: &NodeRecord,
    deadline: Instant,
) -> Result<Programmed, Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let mut annotated = None;
    loop {
        let object = api
            .get_opt(&node.name)
            .await
            .map_err(|e| Error::Kube(format!("reading Node {}", node.name), e))?;
        // Each family's VTEP annotation, next to its podCIDR.
        let family = ctx.lab.ip_family;
        let has_vtep = object.as_ref().is_some_and(|n| {
            n.metadata.annotations.as_ref().is_some_and(|a| {
                (!family.has_v4() || a.contains_key(canal_crds::annotations::BACKEND_DATA))
                    && (!family.has_v6()
                        || a.contains_key(canal_crds::annotations::BACKEND_V6_DATA))
            })
        });
        let cidrs: Vec<IpNet> = object.as_ref().map(kernel::pod_cidrs).unwrap_or_default();
        let mut waiting = vec![];
        match cidrs.len() {
            n if n == family.families().len() && has_vtep => {
                let at = *annotated.get_or_insert_with(Instant::now);
                for other in ctx.state.nodes()?.iter().filter(|o| o.name != node.name) {
                    let routes = kernel::routes(&other.netns)?;
                    for cidr in &cidrs {
                        if !routes.iter().any(|r| r.dst == *cidr) {
                            waiting.push(format!("{} has no route to {cidr}", other.name));
                        }
                    }
                }
                if waiting.is_empty() {
                    return Ok(Programmed {
                        annotated: at,
                        routed: Instant::now(),
                    });
                }
            }
            _ => waiting.push(format!(
                "{} has no podCIDR and VTEP annotation yet",
                node.name
            )),
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "routes to the new node {}:\n  - {}",
                node.name,
                waiting.join("\n  - ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
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
