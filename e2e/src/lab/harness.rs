//! [`Lab`]: the lab as a Rust value for end-to-end tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;

use crate::lab::{
    CONFORMANCE_NAMESPACES, CONFORMANCE_PODS, Context, DEFAULT_PROBE_TIMEOUT,
    DEFAULT_READY_TIMEOUT, DfOutcome, EchoStream, Family, LabNames, MatrixOptions, MatrixRun,
    NodeAdded, NodeRecord, PodOptions, PodRecord, ProbeOutcome, Protocol, Removed, StateDir,
    Target, UpOptions, add_node, cleanup, del_node, kernel, kubectl, names, netns, nodes, pods,
    probe, probe_family, run_matrix, target_ip, target_ip_of, up, wait_programmed,
};
use crate::{Error, process};

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

    /// Probes `to` from `from` in `family`.
    pub async fn probe_family(
        &self,
        from: &str,
        to: &str,
        family: Family,
        port: u16,
        protocol: Protocol,
    ) -> Result<ProbeOutcome, Error> {
        let target: Target = to.parse()?;
        probe_family(
            &self.ctx,
            from,
            &target,
            Some(family),
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

    /// Probes every pod pair in `family`.
    pub async fn matrix_family(
        &self,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Result<MatrixRun, Error> {
        run_matrix(
            &self.ctx,
            &MatrixOptions {
                port,
                protocol,
                family: Some(family),
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
        self.udp_df_family(from, to, None, port, payload).await
    }

    /// [`Lab::udp_df`] in `family` (None: the primary; IPv6 has no DF bit:
    /// the datagram is sent unfragmentable, `IPV6_PMTUDISC_DO`).
    pub async fn udp_df_family(
        &self,
        from: &str,
        to: &str,
        family: Option<Family>,
        port: u16,
        payload: usize,
    ) -> Result<DfOutcome, Error> {
        let source = self.pod(from)?;
        let dst = SocketAddr::new(target_ip_of(&self.ctx, &to.parse()?, family)?, port);
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

    /// What canal-controller serves on `/metrics` (the body only).
    pub fn controller_metrics(&self) -> Result<String, Error> {
        let addr = self
            .ctx
            .lab
            .controller_metrics
            .ok_or_else(|| Error::Lab("this lab runs without the controller".into()))?;
        nodes::http_get(None, addr.port(), "/metrics").map(|r| http_body(&r))
    }

    /// What `node`'s canal-agent serves on `/metrics` (the body only).
    pub fn agent_metrics(&self, node: &str) -> Result<String, Error> {
        let node = self.node(node)?;
        nodes::http_get(Some(&node.netns), names::AGENT_METRICS_PORT, "/metrics")
            .map(|r| http_body(&r))
    }

    /// The agent's log so far.
    pub fn agent_log(&self, node: &str) -> String {
        process::tail(&self.ctx.state.node(node).agent().log(), 10_000)
    }
}

/// The body of a raw HTTP/1.1 response.
fn http_body(response: &str) -> String {
    response
        .split_once("\r\n\r\n")
        .map_or(response, |(_, body)| body)
        .to_string()
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
