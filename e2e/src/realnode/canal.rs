//! canal on the real-kubelet cluster, installed as the README tells users
//! to: `helm install canal charts/canal --namespace kube-system` with the
//! chart's defaults, only the image overridden (it was imported into every
//! node, so nothing is pulled).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ListParams};

use crate::Error;
use crate::lab::netns;
use crate::lab::state::StateDir;
use crate::realnode::RealPaths;

/// The release name.
pub const RELEASE: &str = "canal";
/// The namespace the README installs into.
pub const NAMESPACE: &str = "kube-system";
/// The pods of the release.
pub const SELECTOR: &str = "app.kubernetes.io/name=canal";

/// The chart in this checkout.
pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/canal")
}

/// `helm` with the lab's kubeconfig.
pub fn helm(state: &StateDir) -> Command {
    let mut cmd = Command::new(RealPaths::new(state).bin().join("helm"));
    cmd.env("KUBECONFIG", state.kubeconfig())
        .env("HELM_CACHE_HOME", state.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", state.dir.join("helm/config"))
        .env("HELM_DATA_HOME", state.dir.join("helm/data"));
    cmd
}

/// The `--set` arguments that point the chart at `image` (`repo:tag`).
pub fn image_values(image: &str) -> Vec<String> {
    let (repository, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    vec![
        "--set".into(),
        format!("image.repository={repository}"),
        "--set".into(),
        format!("image.tag={tag}"),
    ]
}

/// `helm install canal charts/canal -n kube-system` with `image` and any
/// extra arguments.
pub fn install(state: &StateDir, image: &str, extra: &[String]) -> Result<String, Error> {
    let mut cmd = helm(state);
    cmd.args(["install", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(image_values(image))
        .args(extra);
    netns::run(&mut cmd)
}

/// `helm upgrade canal charts/canal -n kube-system` with `image` and `extra`.
pub fn upgrade(state: &StateDir, image: &str, extra: &[String]) -> Result<String, Error> {
    let mut cmd = helm(state);
    cmd.args(["upgrade", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(image_values(image))
        .args(extra);
    netns::run(&mut cmd)
}

/// `helm uninstall canal -n kube-system`.
pub fn uninstall(state: &StateDir) -> Result<String, Error> {
    let mut cmd = helm(state);
    cmd.args(["uninstall", RELEASE, "--namespace", NAMESPACE]);
    netns::run(&mut cmd)
}

/// What is not ready yet among the nodes and canal's pods (empty when
/// every Node is Ready, the agent DaemonSet has a ready pod on every node,
/// the controller Deployment is available and every canal pod is Ready).
pub async fn not_ready(client: &Client, nodes: usize) -> Result<Vec<String>, Error> {
    let mut problems = Vec::new();
    let node_list = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::Kube("listing Nodes".into(), e))?;
    if node_list.items.len() < nodes {
        problems.push(format!(
            "{} of {nodes} nodes registered",
            node_list.items.len()
        ));
    }
    for n in &node_list.items {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
        match ready {
            Some(c) if c.status == "True" => {}
            Some(c) => problems.push(format!(
                "node {} not Ready: {}",
                n.metadata.name.as_deref().unwrap_or_default(),
                c.message.as_deref().unwrap_or_default()
            )),
            None => problems.push(format!(
                "node {} has no Ready condition yet",
                n.metadata.name.as_deref().unwrap_or_default()
            )),
        }
    }
    let ds = Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
        .get_opt("canal-agent")
        .await
        .map_err(|e| Error::Kube("reading DaemonSet canal-agent".into(), e))?;
    match ds.and_then(|d| d.status) {
        Some(s)
            if s.number_ready == s.desired_number_scheduled
                && s.desired_number_scheduled as usize >= nodes => {}
        Some(s) => problems.push(format!(
            "canal-agent: {} of {} ready",
            s.number_ready, s.desired_number_scheduled
        )),
        None => problems.push("DaemonSet canal-agent not there yet".into()),
    }
    let deploy = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get_opt("canal-controller")
        .await
        .map_err(|e| Error::Kube("reading Deployment canal-controller".into(), e))?;
    match deploy.and_then(|d| d.status) {
        Some(s)
            if s.ready_replicas.unwrap_or(0) >= 1 && s.unavailable_replicas.unwrap_or(0) == 0 => {}
        Some(s) => problems.push(format!(
            "canal-controller: {} of {} ready",
            s.ready_replicas.unwrap_or(0),
            s.replicas.unwrap_or(0)
        )),
        None => problems.push("Deployment canal-controller not there yet".into()),
    }
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(SELECTOR))
        .await
        .map_err(|e| Error::Kube("listing canal's pods".into(), e))?;
    for p in &pods.items {
        if !pod_ready(p) {
            problems.push(format!(
                "pod {} on {}: {}",
                p.metadata.name.as_deref().unwrap_or_default(),
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .unwrap_or("(unscheduled)"),
                pod_problem(p)
            ));
        }
    }
    Ok(problems)
}

/// Whether a pod's Ready condition is True.
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A short reason why a pod is not ready: a waiting container's reason and
/// message, or its phase.
pub fn pod_problem(p: &Pod) -> String {
    let Some(status) = p.status.as_ref() else {
        return "no status".into();
    };
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        if let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            // A crash loop's cause is in the last termination (the chart's
            // containers report their last log lines there).
            let last = c
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| {
                    format!(
                        "; last exit {} {}: {}",
                        t.exit_code,
                        t.reason.as_deref().unwrap_or_default(),
                        t.message.as_deref().unwrap_or_default().trim()
                    )
                })
                .unwrap_or_default();
            return format!(
                "{} {}: {}{last}",
                c.name,
                w.reason.as_deref().unwrap_or("waiting"),
                w.message.as_deref().unwrap_or_default()
            );
        }
    }
    let conditions: Vec<String> = status
        .conditions
        .iter()
        .flatten()
        .filter(|c| c.status != "True")
        .map(|c| format!("{} {}", c.type_, c.message.as_deref().unwrap_or_default()))
        .collect();
    format!(
        "{} {}",
        status.phase.as_deref().unwrap_or("Pending"),
        conditions.join("; ")
    )
}

/// Waits until [`not_ready`] is empty; the error lists what was not ready.
pub async fn wait_ready(
    client: &Client,
    nodes: usize,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), Error>,
) -> Result<Duration, Error> {
    let started = Instant::now();
    loop {
        let problems = not_ready(client, nodes).await?;
        if problems.is_empty() {
            return Ok(started.elapsed());
        }
        alive()?;
        if started.elapsed() > timeout {
            return Err(Error::Timeout(format!(
                "the cluster with canal to be ready after {}s; not ready:\n  - {}",
                timeout.as_secs(),
                problems.join("\n  - ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
