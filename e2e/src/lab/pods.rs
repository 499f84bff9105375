//! The kubelet stand-in: a pod is a Pod object bound to a node, a network
//! namespace wired by the node's real CNI chain, a status with the pod's IP,
//! and an echo server on its ports.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::lab::cni::{self, Invocation};
use crate::lab::nodes;
use crate::lab::state::{CniRecord, NodeRecord, PodPort, PodRecord};
use crate::lab::{Context, netns};
use crate::process;

/// The image name put on lab pods (nothing pulls it).
pub const IMAGE: &str = "canal-lab/echo:latest";
/// The container name of lab pods.
pub const CONTAINER: &str = "echo";
/// Directories searched for CNI plugins after the node's own bin dir
/// (Debian's containernetworking-plugins puts portmap there).
pub const SYSTEM_CNI_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];

/// What `pod add` needs.
#[derive(Debug, Clone)]
pub struct PodOptions {
    /// Kubernetes namespace (created when missing).
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// The node to run on.
    pub node: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Ports (declared on the container and served by the echo server).
    pub ports: Vec<PodPort>,
}

impl PodOptions {
    /// A pod serving the NetworkPolicy conformance ports (TCP and UDP 80
    /// and 81, named `serve-<port>-<proto>`).
    pub fn new(namespace: &str, name: &str, node: &str) -> PodOptions {
        PodOptions {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            labels: BTreeMap::new(),
            ports: PodPort::conformance_defaults(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> PodOptions {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Replaces the ports.
    pub fn ports(mut self, ports: Vec<PodPort>) -> PodOptions {
        self.ports = ports;
        self
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Splits `NS/NAME`.
pub fn parse_key(key: &str) -> Result<(String, String), Error> {
    match key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(Error::Lab(format!(
            "{key:?}: expected NAMESPACE/NAME, for example x/a"
        ))),
    }
}

fn check_dns_label(what: &str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Lab(format!(
            "{what} {s:?} must be a DNS label (lowercase letters, digits, '-')"
        )))
    }
}

/// The steps of an ADD that succeeded so far, undone in reverse on failure.
#[derive(Default)]
struct Undo {
    pod_object: bool,
    netns: Option<String>,
    cni: Option<(cni::ConfList, Invocation)>,
    echo: bool,
}

/// Adds a pod; on any failure, undoes what it did.
pub async fn add(ctx: &Context, opts: PodOptions) -> Result<PodRecord, Error> {
    check_dns_label("namespace", &opts.namespace)?;
    check_dns_label("pod name", &opts.name)?;
    let node = ctx.state.load_node(&opts.node)?;
    if ctx.state.pod(&opts.namespace, &opts.name).record().exists() {
        return Err(Error::Lab(format!("pod {} already exists", opts.key())));
    }
    let mut undo = Undo::default();
    match add_steps(ctx, &opts, &node, &mut undo).await {
        Ok(record) => Ok(record),
        Err(e) => {
            rollback(ctx, &opts, undo).await;
            Err(e)
        }
    }
}

async fn add_steps(
    ctx: &Context,
    opts: &PodOptions,
    node: &NodeRecord,
    undo: &mut Undo,
) -> Result<PodRecord, Error> {
    ensure_namespace(ctx, &opts.namespace).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &opts.namespace);
    let ports: Vec<_> = opts
        .ports
        .iter()
        .map(|p| {
            let mut port = json!({"containerPort": p.port, "protocol": p.protocol.as_str()});
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            port
        })
        .collect();
    let obj: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": opts.name, "namespace": opts.namespace, "labels": opts.labels},
        "spec": {
            "nodeName": node.name,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": CONTAINER, "image": IMAGE, "ports": ports}],
        },
    }))
    .map_err(|e| Error::Lab(format!("building Pod {}: {e}", opts.key())))?;
    let created = pods
        .create(&PostParams::default(), &obj)
        .await
        .map_err(|e| Error::Kube(format!("creating Pod {}", opts.key()), e))?;
    undo.pod_object = true;
    let uid = created.metadata.uid.clone().unwrap_or_default();
    // The sandbox id a runtime would make: 64 hex characters, unique per Pod.
    let container_id = hex::encode(Sha256::digest(format!("canal-lab/{uid}").as_bytes()));

    let pod_netns = ctx.names.pod_netns(&opts.namespace, &opts.name);
    netns::add(&pod_netns)?;
    undo.netns = Some(pod_netns.clone());

    let node_paths = ctx.state.node(&node.name);
    let (conf_file, list) = cni::load_conf_dir(&node_paths.cni_conf())?;
    let mut cni_path = vec![node_paths.cni_bin()];
    cni_path.extend(SYSTEM_CNI_DIRS.iter().map(Into::into));
    let inv = Invocation {
        node_netns: node.netns.clone(),
        container_id: container_id.clone(),
        netns_path: netns::path(&pod_netns),
        ifname: "eth0".into(),
        args: cni::cni_args(&[
            ("K8S_POD_NAMESPACE", &opts.namespace),
            ("K8S_POD_NAME", &opts.name),
            ("K8S_POD_INFRA_CONTAINER_ID", &container_id),
            ("K8S_POD_UID", &uid),
        ]),
        cni_path,
        pod: opts.key(),
    };
    // A failed ADD is followed by DEL, as the kubelet does.
    undo.cni = Some((list.clone(), inv.clone()));
    let result = {
        let (list, inv) = (list.clone(), inv.clone());
        tokio::task::spawn_blocking(move || cni::add(&list, &inv))
            .await
            .map_err(|e| Error::Lab(format!("CNI ADD task: {e}")))??
    };
    let ips = cni::result_ips(&result);
    // The runtime takes the result's first address as the pod's primary IP.
    let Some(ip) = ips.first().copied() else {
        return Err(Error::Lab(format!(
            "CNI ADD for {} returned no address: {result}",
            opts.key()
        )));
    };
    // A family of the lab may be missing on purpose: canal-cni gives no
    // IPv6 where NetworkPolicy is enforced without IPv6 support.

    let paths = ctx.state.pod(&opts.namespace, &opts.name);
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| Error::Io(format!("creating {}", paths.dir.display()), e))?;
    let echo = paths.echo();
    let listen: Vec<String> = opts
        .ports
        .iter()
        .filter(|p| p.protocol != crate::lab::protocol::Protocol::Sctp)
        .map(|p| format!("{}/{}", p.port, p.protocol))
        .collect();
    // The pod's "container". One that ends before it serves is started
    // once more, as kubelet restarts a container, and the first end is
    // reported on stderr: the echo server is the lab's, not canal's.
    for attempt in 1..=2 {
        let mut cmd = nodes::echo_command(ctx, &pod_netns, &listen, &echo.ready());
        for ip in &ips {
            cmd.arg("--bind").arg(ip.to_string());
        }
        process::spawn_detached(
            &format!("echo server of {}", opts.key()),
            cmd,
            &echo.log(),
            &echo.pid(),
        )?;
        undo.echo = true;
        match nodes::wait_file(
            &echo.ready(),
            &echo.pid(),
            &echo.log(),
            &format!("the echo server of {}", opts.key()),
        )
        .await
        {
            Ok(()) => break,
            Err(e @ Error::Exited { .. }) if attempt == 1 => {
                eprintln!("canal-lab: {e}; starting it again");
            }
            Err(e) => return Err(e),
        }
    }

    let now = super::now();
    let conditions: Vec<_> = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
        .iter()
        .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": now}))
        .collect();
    let pod_ips: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    let status = json!({
        "status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": pod_ips,
            "hostIP": node.addresses().first().map(|a| a.to_string()).unwrap_or_default(),
            "hostIPs": node.addresses().iter().map(|a| json!({"ip": a.to_string()})).collect::<Vec<_>>(),
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": [{
                "name": CONTAINER,
                "image": IMAGE,
                "imageID": "",
                "containerID": format!("canal-lab://{container_id}"),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            }],
        }
    });
    pods.patch_status(&opts.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|e| Error::Kube(format!("writing the status of Pod {}", opts.key()), e))?;

    let record = PodRecord {
        namespace: opts.namespace.clone(),
        name: opts.name.clone(),
        node: node.name.clone(),
        netns: pod_netns,
        uid,
        container_id,
        ips,
        ports: opts.ports.clone(),
        labels: opts.labels.clone(),
        cni: CniRecord { conf_file, result },
    };
    crate::lab::state::write_json(&paths.record(), &record)?;
    Ok(record)
}

async fn rollback(ctx: &Context, opts: &PodOptions, undo: Undo) {
    let paths = ctx.state.pod(&opts.namespace, &opts.name);
    if undo.echo {
        process::stop_pid_file(&paths.echo().pid(), "canal-lab", Duration::from_secs(2));
    }
    if let Some((list, inv)) = undo.cni {
        let _ = tokio::task::spawn_blocking(move || cni::del(&list, &inv, None)).await;
    }
    if let Some(ns) = undo.netns {
        let _ = netns::delete(&ns);
    }
    if undo.pod_object {
        let _ = delete_object(ctx, &opts.namespace, &opts.name).await;
    }
    let _ = std::fs::remove_dir_all(&paths.dir);
}

/// Creates a namespace when missing, labelled `kubernetes.io/metadata.name`
/// as the API server does, plus `labels`.
pub async fn ensure_namespace(ctx: &Context, name: &str) -> Result<(), Error> {
    ensure_namespace_with(ctx, name, &BTreeMap::new()).await
}

/// Creates a namespace when missing, or adds `labels` to an existing one.
pub async fn ensure_namespace_with(
    ctx: &Context,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), Error> {
    check_dns_label("namespace", name)?;
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let mut all = labels.clone();
    all.insert("kubernetes.io/metadata.name".into(), name.into());
    let obj: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": all},
    }))
    .map_err(|e| Error::Lab(format!("building Namespace {name}: {e}")))?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            if labels.is_empty() {
                return Ok(());
            }
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await
            .map(|_| ())
            .map_err(|e| Error::Kube(format!("labelling Namespace {name}"), e))
        }
        Err(e) => Err(Error::Kube(format!("creating Namespace {name}"), e)),
    }
}

async fn delete_object(ctx: &Context, namespace: &str, name: &str) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    // No kubelet confirms a graceful deletion: remove it at once.
    match pods
        .delete(name, &DeleteParams::default().grace_period(0))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(format!("deleting Pod {namespace}/{name}"), e)),
    }
}

/// Deletes a pod: CNI DEL through the chain it was added with, the echo
/// server, the namespace, the Pod object and its record.
pub async fn del(ctx: &Context, namespace: &str, name: &str) -> Result<(), Error> {
    let record = ctx.state.load_pod(namespace, name)?;
    let paths = ctx.state.pod(namespace, name);
    process::stop_pid_file(&paths.echo().pid(), "canal-lab", Duration::from_secs(2));
    let mut cni_error = None;
    if let Ok(node) = ctx.state.load_node(&record.node)
        && record.cni.conf_file.exists()
    {
        let text = std::fs::read_to_string(&record.cni.conf_file)
            .map_err(|e| Error::Io(format!("reading {}", record.cni.conf_file.display()), e))?;
        let is_list = record.cni.conf_file.extension().and_then(|e| e.to_str()) == Some("conflist");
        let list = cni::parse_conf(&text, is_list).map_err(|e| {
            Error::Lab(format!(
                "CNI configuration {}: {e}",
                record.cni.conf_file.display()
            ))
        })?;
        let node_paths = ctx.state.node(&node.name);
        let mut cni_path = vec![node_paths.cni_bin()];
        cni_path.extend(SYSTEM_CNI_DIRS.iter().map(Into::into));
        let inv = Invocation {
            node_netns: node.netns.clone(),
            container_id: record.container_id.clone(),
            netns_path: netns::path(&record.netns),
            ifname: "eth0".into(),
            args: cni::cni_args(&[
                ("K8S_POD_NAMESPACE", namespace),
                ("K8S_POD_NAME", name),
                ("K8S_POD_INFRA_CONTAINER_ID", &record.container_id),
                ("K8S_POD_UID", &record.uid),
            ]),
            cni_path,
            pod: record.key(),
        };
        let cached = record.cni.result.clone();
        cni_error = tokio::task::spawn_blocking(move || cni::del(&list, &inv, Some(&cached)))
            .await
            .map_err(|e| Error::Lab(format!("CNI DEL task: {e}")))?
            .err();
    }
    netns::delete(&record.netns)?;
    delete_object(ctx, namespace, name).await?;
    let _ = std::fs::remove_dir_all(&paths.dir);
    // The pod is gone either way; a failed DEL is still worth reporting.
    cni_error.map_or(Ok(()), Err)
}

/// Deletes every pod on `node` (before the node goes away).
pub async fn del_on_node(ctx: &Context, node: &str) -> Result<Vec<String>, Error> {
    let mut gone = Vec::new();
    for pod in ctx.state.pods()?.into_iter().filter(|p| p.node == node) {
        del(ctx, &pod.namespace, &pod.name).await?;
        gone.push(pod.key());
    }
    Ok(gone)
}
