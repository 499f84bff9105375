//! [`RealLab`]: the real-kubelet lab as a Rust value for tests, taken down
//! on drop (also when the test panics).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;

use crate::Error;
use crate::lab::netns;
use crate::lab::state::{NodeRecord, StateDir};
use crate::lab::{Context, cleanup, names};
use crate::realnode::node::NodeContext;
use crate::realnode::up::{self, RealUpOptions};
use crate::realnode::{RealPaths, RealRecord, canal};

/// How often a restarted node's kubelet is started again when it exits.
const KUBELET_RESTARTS: u32 = 5;

/// A real-kubelet lab owned by a test.
pub struct RealLab {
    ctx: Context,
    record: RealRecord,
    owned: bool,
}

impl RealLab {
    /// A state directory for the test `name`, distinct per checkout.
    pub fn test_state_dir(name: &str) -> PathBuf {
        let checkout = names::LabNames::for_state_dir(Path::new(env!("CARGO_MANIFEST_DIR")));
        std::env::temp_dir().join(format!("canal-real-{}-{name}", &checkout.prefix[2..]))
    }

    /// Brings a lab up in `state_dir`, replacing what a previous run left.
    pub async fn up(state_dir: impl Into<PathBuf>, opts: RealUpOptions) -> Result<RealLab, Error> {
        let state = StateDir::new(state_dir);
        let (ctx, record) = up::up(
            &state,
            &RealUpOptions {
                replace: true,
                ..opts
            },
        )
        .await?;
        Ok(RealLab {
            ctx,
            record,
            owned: true,
        })
    }

    /// Attaches to a running lab (not taken down on drop).
    pub async fn open(state_dir: impl Into<PathBuf>) -> Result<RealLab, Error> {
        let (ctx, record) = up::open(&StateDir::new(state_dir)).await?;
        Ok(RealLab {
            ctx,
            record,
            owned: false,
        })
    }

    /// Takes the lab down now and reports what was removed.
    pub fn down(mut self) -> cleanup::Removed {
        self.owned = false;
        cleanup::down(&self.ctx.state)
    }

    /// The lab's context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
    /// What `up` recorded.
    pub fn record(&self) -> &RealRecord {
        &self.record
    }
    /// An admin client.
    pub fn client(&self) -> Client {
        self.ctx.client.clone()
    }
    /// The state directory.
    pub fn state(&self) -> &StateDir {
        &self.ctx.state
    }
    /// The lab's paths.
    pub fn paths(&self) -> RealPaths {
        RealPaths::new(&self.ctx.state)
    }
    /// The nodes.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        self.ctx.state.nodes()
    }
    /// One node.
    pub fn node(&self, name: &str) -> Result<NodeRecord, Error> {
        self.ctx.state.load_node(name)
    }
    /// Starting and inspecting node processes.
    pub fn node_context(&self) -> Result<NodeContext, Error> {
        up::node_context(&self.ctx.state, &self.record)
    }

    /// `kubectl` with the lab's kubeconfig.
    pub fn kubectl(&self) -> Result<Command, Error> {
        let mut cmd = Command::new(self.paths().bin().join("kubectl"));
        cmd.env("KUBECONFIG", self.ctx.state.kubeconfig());
        Ok(cmd)
    }

    /// Runs kubectl; its stdout, or an error with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String, Error> {
        let mut cmd = self.kubectl()?;
        cmd.args(args);
        netns::run(&mut cmd)
    }

    /// `helm` with the lab's kubeconfig.
    pub fn helm(&self) -> Command {
        canal::helm(&self.ctx.state)
    }

    /// Waits until the pod `ns/name` is Ready and returns it.
    pub async fn wait_pod_ready(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Pod, Error> {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let deadline = Instant::now() + timeout;
        loop {
            let pod = api
                .get_opt(name)
                .await
                .map_err(|e| Error::Kube(format!("reading pod {ns}/{name}"), e))?;
            match &pod {
                Some(p) if canal::pod_ready(p) => return Ok(p.clone()),
                _ if Instant::now() > deadline => {
                    return Err(Error::Timeout(format!(
                        "pod {ns}/{name} to be Ready: {}",
                        pod.as_ref()
                            .map(canal::pod_problem)
                            .unwrap_or_else(|| "not found".into())
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String, Error> {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// Runs kubectl with `input` on its stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String, Error> {
        use std::io::Write;
        let mut cmd = self.kubectl()?;
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let shown = format!("kubectl {}", args.join(" "));
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Io(format!("running {shown}"), e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| Error::Io(format!("writing to {shown}"), e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Io(format!("running {shown}"), e))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: shown,
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl exec -n NS POD -- ARGS`; stdout, or an error with stderr.
    pub fn exec(&self, ns: &str, pod: &str, args: &[&str]) -> Result<String, Error> {
        let mut all = vec!["exec", "-n", ns, pod, "--"];
        all.extend_from_slice(args);
        self.kubectl_ok(&all)
    }

    /// A pod's IPv4 address.
    pub async fn pod_ip(&self, ns: &str, name: &str) -> Result<std::net::Ipv4Addr, Error> {
        let pod = Api::<Pod>::namespaced(self.client(), ns)
            .get(name)
            .await
            .map_err(|e| Error::Kube(format!("reading pod {ns}/{name}"), e))?;
        pod.status
            .and_then(|s| s.pod_ip)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| Error::Lab(format!("pod {ns}/{name} has no IPv4 address")))
    }

    /// Stops kubelet and containerd of `node` (pods keep running: their
    /// shims do not depend on containerd), then starts them again and waits
    /// until the node is Ready.
    pub async fn restart_kubelet_and_containerd(
        &self,
        node: &str,
        timeout: Duration,
    ) -> Result<(), Error> {
        let n = self.node(node)?;
        let ctx = self.node_context()?;
        ctx.stop(&n, "kubelet", Duration::from_secs(10));
        ctx.stop(&n, "containerd", Duration::from_secs(10));
        ctx.start_containerd(&n).await?;
        ctx.start_kubelet(&n)?;
        let deadline = Instant::now() + timeout;
        let mut restarts = 0;
        loop {
            let healthy = crate::lab::nodes::http_get(Some(&n.netns), 10248, "/healthz")
                .is_ok_and(|r| crate::lab::kernel::http_ok(&r));
            if healthy {
                break;
            }
            if let Err(e) = ctx.check(&n, "kubelet") {
                // containerd answers `ctr version` before its CRI service
                // has restored its sandboxes, and a kubelet started in that
                // gap exits ("server is not initialized yet"). systemd
                // restarts kubelet (kubeadm's unit: Restart=always); so
                // does the lab, a few times, saying so.
                if restarts == KUBELET_RESTARTS {
                    return Err(e);
                }
                restarts += 1;
                eprintln!("kubelet on {node} exited, starting it again ({restarts}): {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                ctx.start_kubelet(&n)?;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "kubelet on {node} to be healthy again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.wait_cluster_ready(deadline.saturating_duration_since(Instant::now()))
            .await
            .map(|_| ())
    }

    /// Waits until every node and canal pod is ready again.
    pub async fn wait_cluster_ready(&self, timeout: Duration) -> Result<Duration, Error> {
        let nodes = self.nodes()?.len();
        canal::wait_ready(&self.ctx.client, nodes, timeout, || Ok(())).await
    }
}

impl Drop for RealLab {
    fn drop(&mut self) {
        if self.owned && std::env::var_os("CANAL_KEEP_LAB").is_none() {
            cleanup::down(&self.ctx.state);
        }
    }
}
