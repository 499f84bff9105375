//! Configuration files of a real node: containerd's, kubelet's and
//! kube-proxy's. Pure renderers; every setting that exists because of this
//! machine (or of running several nodes on one kernel) says why.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::json;

/// The sandbox (pause) image every node's containerd uses; kubelet 1.37's
/// default, built from the module's `pause.c` and imported into each node.
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10.2";
/// containerd's socket inside a node (its private `/run`).
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// kubelet's API port on the node address.
pub const KUBELET_PORT: u16 = 10250;

/// containerd's config (format version 2, containerd 1.6).
#[derive(Debug, Clone)]
pub struct Containerd {
    /// The runc binary.
    pub runc: PathBuf,
}

impl Containerd {
    /// Renders `config.toml`.
    pub fn render(&self) -> String {
        format!(
            r#"# Written by canal-lab for one real-kubelet node. / is the node's view
# (its own /run, /var/lib/containerd, /etc/cni/net.d, /opt/cni/bin).
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
oom_score = 0
# Only what the CRI needs: no tracing exporter, no btrfs/zfs/devmapper/aufs.
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  # Root here has no CAP_SYS_RESOURCE: lowering oom_score_adj (kubelet asks
  # -998 for the pause container) fails inside runc, and every sandbox with
  # it. Clamp to the caller's own value instead.
  restrict_oom_score_adj = true
  disable_apparmor = true
  disable_cgroup = false
  enable_selinux = false
  max_concurrent_downloads = 3
  # No registry is reachable: images are imported, never pulled.
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    # Nothing here until the chart's install-cni init container writes it.
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#,
            socket = CONTAINERD_SOCKET,
            sandbox = SANDBOX_IMAGE,
            runc = self.runc.display(),
        )
    }
}

/// kubelet's settings for one node.
#[derive(Debug, Clone)]
pub struct Kubelet {
    /// The node's underlay address (kubelet serves there; the API server
    /// dials it for logs and exec).
    pub node_ip: Ipv4Addr,
    /// `cgroupRoot`, below the harness's own cgroup.
    pub cgroup_root: String,
    /// The cluster CA (client certificates of the API server).
    pub client_ca: PathBuf,
    /// The resolv.conf pods with `dnsPolicy: Default` get.
    pub resolv_conf: PathBuf,
}

impl Kubelet {
    /// Renders the KubeletConfiguration.
    pub fn render(&self) -> String {
        let config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip.to_string(),
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": self.client_ca.display().to_string()},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": format!("unix://{CONTAINERD_SOCKET}"),
            // The machine has cgroup v1 controllers (hybrid): kubelet refuses
            // them unless told, and runs with the cgroupfs driver below the
            // harness's own cgroup.
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "cgroupsPerQOS": true,
            "enforceNodeAllocatable": ["pods"],
            // Check, never write, the machine-wide tunables (the node's
            // mount namespace shows files with the values kubelet wants).
            "protectKernelDefaults": true,
            // Lowering its own oom_score_adj needs CAP_SYS_RESOURCE.
            "oomScoreAdj": 0,
            "failSwapOn": false,
            // No registry: an image removed by GC could never come back, and
            // several nodes share one disk that other work fills.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "imageMinimumGCAge": "87600h",
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
                "imagefs.inodesFree": "1%",
            },
            "evictionMinimumReclaim": {},
            "serializeImagePulls": false,
            "resolvConf": self.resolv_conf.display().to_string(),
            "clusterDomain": "cluster.local",
            "staticPodPath": "",
            "rotateCertificates": false,
            "serverTLSBootstrap": false,
            "kernelMemcgNotification": false,
            "maxPods": 110,
            "nodeStatusUpdateFrequency": "10s",
            "nodeStatusReportFrequency": "1m",
            "syncFrequency": "30s",
            "runtimeRequestTimeout": "2m",
            "shutdownGracePeriod": "0s",
            "containerLogMaxSize": "5Mi",
            "containerLogMaxFiles": 2,
            "logging": {"format": "text", "verbosity": 1},
        });
        format!(
            "# Written by canal-lab for one real-kubelet node.\n{}",
            serde_yaml::to_string(&config).unwrap_or_default()
        )
    }
}

/// kube-proxy's settings for one node.
#[derive(Debug, Clone)]
pub struct KubeProxy {
    /// The node's name.
    pub node: String,
    /// The node's kubeconfig for kube-proxy.
    pub kubeconfig: PathBuf,
    /// The pod network (traffic from outside it to a Service is masqueraded).
    pub cluster_cidr: String,
}

impl KubeProxy {
    /// Renders the KubeProxyConfiguration.
    pub fn render(&self) -> String {
        let config = json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.kubeconfig.display().to_string()},
            "hostnameOverride": self.node,
            "mode": "iptables",
            "clusterCIDR": self.cluster_cidr,
            "bindAddress": "0.0.0.0",
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            // nf_conntrack_max and the conntrack timeouts are machine-wide
            // (or shared by every node here): 0 means "leave them alone".
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
                "udpTimeout": "0s",
                "udpStreamTimeout": "0s",
            },
            "oomScoreAdj": 0,
            "iptables": {"syncPeriod": "30s", "minSyncPeriod": "1s"},
            "logging": {"format": "text", "verbosity": 1},
        });
        format!(
            "# Written by canal-lab for one real-kubelet node.\n{}",
            serde_yaml::to_string(&config).unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_clamps_oom_scores_and_uses_runc() {
        let text = Containerd {
            runc: "/usr/sbin/runc".into(),
        }
        .render();
        assert!(text.contains("restrict_oom_score_adj = true"));
        assert!(text.contains(r#"BinaryName = "/usr/sbin/runc""#));
        assert!(text.contains("SystemdCgroup = false"));
        assert!(text.contains(&format!(r#"sandbox_image = "{SANDBOX_IMAGE}""#)));
        assert!(text.contains(r#"conf_dir = "/etc/cni/net.d""#));
    }

    #[test]
    fn kubelet_never_writes_machine_settings() {
        let text = Kubelet {
            node_ip: Ipv4Addr::new(172, 30, 1, 11),
            cgroup_root: "/a/canal-x/node-1/pods".into(),
            client_ca: "/s/ca.crt".into(),
            resolv_conf: "/s/resolv.conf".into(),
        }
        .render();
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(v["protectKernelDefaults"], serde_yaml::Value::Bool(true));
        assert_eq!(v["failCgroupV1"], serde_yaml::Value::Bool(false));
        assert_eq!(v["cgroupRoot"].as_str(), Some("/a/canal-x/node-1/pods"));
        assert_eq!(v["address"].as_str(), Some("172.30.1.11"));
        assert_eq!(v["imageGCHighThresholdPercent"].as_u64(), Some(100));
        assert_eq!(v["oomScoreAdj"].as_i64(), Some(0));
        assert_eq!(
            v["authentication"]["anonymous"]["enabled"],
            serde_yaml::Value::Bool(false)
        );
    }

    #[test]
    fn kube_proxy_leaves_conntrack_alone() {
        let text = KubeProxy {
            node: "node-1".into(),
            kubeconfig: "/s/kc".into(),
            cluster_cidr: "10.244.0.0/16".into(),
        }
        .render();
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        for key in ["maxPerCore", "min"] {
            assert_eq!(v["conntrack"][key].as_u64(), Some(0), "{key}");
        }
        for key in [
            "tcpEstablishedTimeout",
            "tcpCloseWaitTimeout",
            "udpTimeout",
            "udpStreamTimeout",
        ] {
            assert_eq!(v["conntrack"][key].as_str(), Some("0s"), "{key}");
        }
        assert_eq!(v["mode"].as_str(), Some("iptables"));
        assert_eq!(v["hostnameOverride"].as_str(), Some("node-1"));
    }
}
