//! Parsing and validating a CNI invocation: the network configuration on
//! stdin, the `CNI_*` environment and `CNI_ARGS`. Pure.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::error::{CniError, Code};

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version of documents that are not answers to a request.
pub const LATEST_VERSION: &str = "1.0.0";
/// Default run directory (where canal-agent writes network.json).
pub const DEFAULT_RUN_DIR: &str = "/run/canal";
/// Default IPAM state directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/canal";
/// Default wait for the policy handshake.
pub const DEFAULT_POLICY_WAIT_SECONDS: f64 = 10.0;

/// The plugin's network configuration (one entry of the conflist, with the
/// list's `name` and `cniVersion` filled in by the runtime).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// CNI version of the request.
    pub cni_version: String,
    /// Network name (IPAM state is kept per network).
    pub name: String,
    /// Plugin type.
    #[serde(rename = "type")]
    pub type_: String,
    /// Where canal-agent writes network.json.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Where IP allocations are recorded.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// MTU of pod interfaces; 0 = canal-agent's (from network.json).
    #[serde(default)]
    pub mtu: u32,
    /// How long ADD waits for the agent to program policy for the pod.
    #[serde(default = "default_policy_wait")]
    pub policy_wait_seconds: f64,
    /// The previous plugin's result (CHECK, DEL).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC (CNI 1.1): the attachments that are still in use.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// A container attachment (GC).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name in the container.
    pub ifname: String,
}

fn default_run_dir() -> PathBuf {
    PathBuf::from(DEFAULT_RUN_DIR)
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_policy_wait() -> f64 {
    DEFAULT_POLICY_WAIT_SECONDS
}

impl NetConf {
    /// Parses and validates stdin.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                "cannot decode the network configuration",
                format!("stdin is not a canal-cni configuration: {e}"),
            )
        })?;
        let version = conf.cni_version.clone();
        let invalid = |details: String| {
            CniError::new(
                Code::InvalidConfig,
                "invalid network configuration",
                details,
            )
            .in_version(&version)
        };
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "cniVersion {:?} is not one of {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let name_ok = !conf.name.is_empty()
            && conf.name != "."
            && conf.name != ".."
            && conf
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(invalid(format!(
                "name {:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                conf.name
            )));
        }
        if conf.mtu != 0 && !(576..=65535).contains(&conf.mtu) {
            return Err(invalid(format!(
                "mtu {} must be 0 (use canal-agent's) or within 576..65535",
                conf.mtu
            )));
        }
        if !(0.0..=600.0).contains(&conf.policy_wait_seconds) {
            return Err(invalid(format!(
                "policyWaitSeconds {} must be within 0..600",
                conf.policy_wait_seconds
            )));
        }
        if !conf.run_dir.is_absolute() || !conf.data_dir.is_absolute() {
            return Err(invalid("runDir and dataDir must be absolute paths".into()));
        }
        Ok(conf)
    }

    /// The policy wait as a duration.
    pub fn policy_wait(&self) -> Duration {
        Duration::from_secs_f64(self.policy_wait_seconds)
    }

    /// Whether results use the pre-1.0 shape (`ips[].version`).
    pub fn legacy_result(&self) -> bool {
        matches!(self.cni_version.as_str(), "0.3.0" | "0.3.1" | "0.4.0")
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    /// CNI_COMMAND.
    pub command: String,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS.
    pub netns: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_ARGS.
    pub args: String,
    /// CNI_PATH.
    pub path: String,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> CniEnv {
        let get = |k: &str| std::env::var(k).unwrap_or_default();
        CniEnv {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    /// `CNI_ARGS` as key/value pairs (`K=V;K=V`).
    pub fn args_map(&self) -> BTreeMap<String, String> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// The pod's namespace and name, when the runtime passed them.
    pub fn pod(&self) -> Option<(String, String)> {
        let args = self.args_map();
        let ns = args.get("K8S_POD_NAMESPACE").filter(|s| !s.is_empty())?;
        let pod = args.get("K8S_POD_NAME").filter(|s| !s.is_empty())?;
        Some((ns.clone(), pod.clone()))
    }

    /// The host-side interface name: Calico's `cali` + hash of
    /// `namespace.pod`; without Kubernetes arguments, a hash of the
    /// container ID and interface.
    pub fn host_interface(&self) -> String {
        match self.pod() {
            Some((ns, pod)) => canal_crds::names::veth_name(&ns, &pod),
            None => canal_crds::names::veth_name(&self.container_id, &self.ifname),
        }
    }

    /// Checks the variables a command needs and that they are well formed
    /// (the container ID and interface name end up in file names, interface
    /// aliases and line-based IPAM records).
    pub fn require(&self, with_netns: bool) -> Result<(), CniError> {
        let mut missing = Vec::new();
        if self.container_id.is_empty() {
            missing.push("CNI_CONTAINERID");
        }
        if self.ifname.is_empty() {
            missing.push("CNI_IFNAME");
        }
        if with_netns && self.netns.is_empty() {
            missing.push("CNI_NETNS");
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                "missing environment variables",
                format!("{} must be set", missing.join(", ")),
            ));
        }
        if !valid_container_id(&self.container_id) {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                "invalid CNI_CONTAINERID",
                format!(
                    "{:?} is not a container ID: it must start with a letter or digit, continue with letters, digits, '_', '.' or '-', and be at most {MAX_CONTAINER_ID} characters",
                    self.container_id
                ),
            ));
        }
        if !valid_ifname(&self.ifname) {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                "invalid CNI_IFNAME",
                format!(
                    "{:?} is not a valid interface name (1 to 15 bytes, not '.' or '..', no '/', ':' or whitespace)",
                    self.ifname
                ),
            ));
        }
        Ok(())
    }
}

/// The longest container ID accepted: it must fit in an interface alias
/// (255 bytes) together with the interface name, see
/// [`super::ownership::marker`].
pub const MAX_CONTAINER_ID: usize = 200;

/// The CNI spec's container ID: an alphanumeric character followed by
/// alphanumerics, '_', '.' or '-' (libcni's `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`),
/// bounded in length.
pub fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= MAX_CONTAINER_ID
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// A name the kernel accepts for a network interface (its
/// `dev_valid_name`): 1 to 15 bytes, not `.` or `..`, no `/`, `:`,
/// whitespace or NUL.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace() || b == 0x0b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"canal-cni"{extra}}}"#)
            .into_bytes()
    }

    #[test]
    fn defaults_are_filled_in() {
        let c = NetConf::parse(&conf("")).unwrap();
        assert_eq!(c.run_dir, PathBuf::from("/run/canal"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/canal"));
        assert_eq!(c.mtu, 0);
        assert_eq!(c.policy_wait(), Duration::from_secs(10));
        assert!(!c.legacy_result());
    }

    #[test]
    fn bad_configs_get_the_right_codes() {
        let code = |b: &[u8]| NetConf::parse(b).unwrap_err().code;
        assert_eq!(code(b"not json"), Code::Decode as u32);
        assert_eq!(
            code(br#"{"cniVersion":"2.0.0","name":"n","type":"t"}"#),
            Code::IncompatibleVersion as u32
        );
        assert_eq!(code(&conf(r#","mtu":100"#)), Code::InvalidConfig as u32);
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"../x","type":"t"}"#),
            Code::InvalidConfig as u32
        );
        assert_eq!(
            code(&conf(r#","policyWaitSeconds":-1"#)),
            Code::InvalidConfig as u32
        );
        assert_eq!(
            code(&conf(r#","runDir":"rel""#)),
            Code::InvalidConfig as u32
        );
    }

    #[test]
    fn valid_attachments_parse() {
        let c = NetConf::parse(&conf(
            r#","cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]"#,
        ))
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn cni_args_give_the_pod_and_its_interface_name() {
        let env = CniEnv {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=nginx;K8S_POD_INFRA_CONTAINER_ID=c1".into(),
            ..CniEnv::default()
        };
        assert_eq!(env.pod(), Some(("default".into(), "nginx".into())));
        assert_eq!(
            env.host_interface(),
            canal_crds::names::veth_name("default", "nginx")
        );
        let bare = CniEnv {
            args: String::new(),
            ..env.clone()
        };
        assert_eq!(bare.pod(), None);
        assert!(bare.host_interface().starts_with("cali"));
        assert_eq!(bare.host_interface().len(), 15);
    }

    #[test]
    fn environment_is_checked() {
        let mut env = CniEnv {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/x".into(),
            ..CniEnv::default()
        };
        assert!(env.require(true).is_ok());
        env.netns.clear();
        let e = env.require(true).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment as u32);
        assert!(e.details.contains("CNI_NETNS"));
        assert!(env.require(false).is_ok());
        env.ifname = "a-very-long-interface".into();
        assert!(env.require(false).is_err());
    }

    #[test]
    fn container_ids_follow_the_spec_and_fit_an_alias() {
        for ok in ["c1", "0abc", "a.b_c-d", &"f".repeat(MAX_CONTAINER_ID)] {
            assert!(valid_container_id(ok), "{ok}");
        }
        let long = "f".repeat(MAX_CONTAINER_ID + 1);
        for bad in [
            "", "../x", "a/b", "-a", ".a", "_a", "a b", "a\nb", "a:b", "é", &long,
        ] {
            assert!(!valid_container_id(bad), "{bad:?}");
        }
        let env = CniEnv {
            container_id: "../../etc".into(),
            ifname: "eth0".into(),
            ..CniEnv::default()
        };
        let e = env.require(false).unwrap_err();
        assert_eq!(e.code, Code::InvalidEnvironment as u32);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e:?}");
    }

    #[test]
    fn interface_names_are_what_the_kernel_accepts() {
        for ok in ["eth0", "net1", "a", "abcdefghijklmno", "caliX.1-2_3"] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "eth0\n",
            "a\0b",
            "abcdefghijklmnop",
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }
}
