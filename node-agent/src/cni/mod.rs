//! canal-cni, the CNI plugin (spec 1.0.0; STATUS and GC of 1.1.0): ADD wires
//! a pod with a veth pair and an address from the node subnet canal-agent
//! wrote to `<runDir>/network.json`; DEL undoes it; CHECK verifies it. The
//! plugin never talks to the API server. [`config`], [`ipam::decide`] and
//! [`result`] decide; [`dataplane`] and the IPAM store do the I/O.

pub mod config;
pub mod dataplane;
pub mod error;
pub mod install;
pub mod ipam;
pub mod result;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use config::{CniEnv, NetConf, SUPPORTED_VERSIONS};
use dataplane::{DataplaneError, PodSpec};
use error::{CniError, Code};
use ipam::{Decision, Store};

use crate::runfiles::{NetworkFile, RunDir};

/// Runs one CNI invocation; writes the result or error document to `out` and
/// returns the process exit code.
pub fn main_with(env: &CniEnv, stdin: &[u8], out: &mut impl Write) -> i32 {
    let result = match env.command.as_str() {
        "VERSION" => Ok(Some(version_document())),
        "ADD" => run_async(|| add(env, stdin)).map(Some),
        "DEL" => run_async(|| del(env, stdin)).map(|()| None),
        "CHECK" => run_async(|| check(env, stdin)).map(|()| None),
        "STATUS" => status(stdin).map(|()| None),
        "GC" => gc(stdin).map(|()| None),
        other => Err(CniError::new(
            Code::InvalidEnvironment,
            "unsupported CNI_COMMAND",
            format!("{other:?}; canal-cni supports ADD, DEL, CHECK, VERSION, STATUS and GC"),
        )),
    };
    match result {
        Ok(doc) => {
            if let Some(doc) = doc {
                let _ = writeln!(out, "{doc}");
            }
            0
        }
        Err(e) => {
            eprintln!("canal-cni {}: {}: {}", env.command, e.msg, e.details);
            let _ = writeln!(out, "{}", e.to_json());
            1
        }
    }
}

fn version_document() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": config::LATEST_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

fn run_async<T, F, Fut>(f: F) -> Result<T, CniError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, CniError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(Code::Io, "cannot start", e.to_string()))?;
    runtime.block_on(f())
}

fn read_network(conf: &NetConf) -> Result<NetworkFile, CniError> {
    let run = RunDir::new(&conf.run_dir);
    match run.read_network() {
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(CniError::new(
            Code::TryAgainLater,
            "canal-agent has not configured this node yet",
            format!(
                "{} does not exist; is canal-agent running on this node and has the Node a podCIDR?",
                run.network_file().display()
            ),
        )
        .in_version(&conf.cni_version)),
        Err(e) => Err(CniError::new(Code::Io, "cannot read the agent's network file", e.to_string())
            .in_version(&conf.cni_version)),
    }
}

fn store_error(conf: &NetConf) -> impl Fn(ipam::StoreError) -> CniError + '_ {
    move |e| {
        CniError::new(Code::Io, "IPAM store failure", e.to_string()).in_version(&conf.cni_version)
    }
}

fn dataplane_error(conf: &NetConf, e: DataplaneError) -> CniError {
    let code = match &e {
        DataplaneError::NoNetns { .. } => Code::UnknownContainer,
        DataplaneError::Mismatch(_) => Code::CheckFailed,
        _ => Code::Dataplane,
    };
    let msg = match code {
        Code::UnknownContainer => "the container's network namespace does not exist",
        Code::CheckFailed => "the pod's network differs from what ADD set up",
        _ => "setting up the pod interface failed",
    };
    CniError::new(code, msg, e.to_string()).in_version(&conf.cni_version)
}

async fn add(env: &CniEnv, stdin: &[u8]) -> Result<serde_json::Value, CniError> {
    let conf = NetConf::parse(stdin)?;
    let v = conf.cni_version.clone();
    env.require(true).map_err(|e| e.in_version(&v))?;
    let network = read_network(&conf)?;
    let mtu = if conf.mtu != 0 { conf.mtu } else { network.mtu };
    let netns = PathBuf::from(&env.netns);
    // Before any allocation: a missing namespace leaves nothing behind.
    let pod = dataplane::pod_handle(&netns).map_err(|e| dataplane_error(&conf, e))?;
    let host = crate::netns::handle_here().map_err(|e| dataplane_error(&conf, e.into()))?;

    let store = Store::new(&conf.data_dir, &conf.name);
    let (ip, fresh) = {
        let locked = store.lock().map_err(store_error(&conf))?;
        let allocations = locked.allocations().map_err(store_error(&conf))?;
        match ipam::decide(
            network.node_subnet,
            &allocations,
            &env.container_id,
            &env.ifname,
            locked.last_reserved(),
        ) {
            Decision::Existing(ip) => (ip, false),
            Decision::New(ip) => {
                // Records of this container+interface from an old subnet go.
                locked
                    .release(&env.container_id, &env.ifname)
                    .map_err(store_error(&conf))?;
                locked
                    .reserve(ip, &env.container_id, &env.ifname)
                    .map_err(store_error(&conf))?;
                (ip, true)
            }
            Decision::Exhausted => {
                return Err(CniError::new(
                    Code::SubnetExhausted,
                    "no free address in the node's pod subnet",
                    format!(
                        "every usable address of {} is allocated ({} records in {})",
                        network.node_subnet,
                        allocations.len(),
                        store.dir().display()
                    ),
                )
                .in_version(&v));
            }
        }
    };
    let host_if = env.host_interface();
    let spec = PodSpec {
        netns,
        ifname: env.ifname.clone(),
        host_if: host_if.clone(),
        ip,
        mtu,
    };
    let wired = match dataplane::add(&host, &pod, &spec).await {
        Ok(w) => w,
        Err(e) => {
            if fresh && let Ok(locked) = store.lock() {
                let _ = locked.release(&env.container_id, &env.ifname);
            }
            return Err(dataplane_error(&conf, e));
        }
    };
    wait_for_policy(&RunDir::new(&conf.run_dir), &host_if, conf.policy_wait()).await;
    Ok(result::add_result(&v, &wired, conf.legacy_result()))
}

/// The zero-leak handshake: while policy is enforced, wait (bounded) until
/// the agent has programmed this interface's chains. Traffic of an unknown
/// interface is dropped, so a timeout only delays the pod's first packet.
async fn wait_for_policy(run: &RunDir, host_if: &str, timeout: Duration) {
    if !run.policy_enabled_file().exists() {
        return;
    }
    let file = run.endpoint_file(host_if);
    let deadline = Instant::now() + timeout;
    while !file.exists() {
        if Instant::now() >= deadline {
            eprintln!(
                "canal-cni: policy for {host_if} not programmed after {timeout:?} ({} missing); continuing, its traffic is dropped until it is",
                file.display()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn del(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    env.require(false)
        .map_err(|e| e.in_version(&conf.cni_version))?;
    let host = crate::netns::handle_here().map_err(|e| dataplane_error(&conf, e.into()))?;
    let pod = if env.netns.is_empty() {
        None
    } else {
        match dataplane::pod_handle(Path::new(&env.netns)) {
            Ok(h) => Some(h),
            // The sandbox is gone, and with it the veth pair.
            Err(DataplaneError::NoNetns { .. }) => None,
            Err(e) => return Err(dataplane_error(&conf, e)),
        }
    };
    let host_if = env.host_interface();
    dataplane::del(&host, pod.as_ref(), &env.ifname, Some(&host_if))
        .await
        .map_err(|e| dataplane_error(&conf, e))?;
    let store = Store::new(&conf.data_dir, &conf.name);
    let locked = store.lock().map_err(store_error(&conf))?;
    locked
        .release(&env.container_id, &env.ifname)
        .map_err(store_error(&conf))?;
    Ok(())
}

async fn check(env: &CniEnv, stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    let v = conf.cni_version.clone();
    if matches!(v.as_str(), "0.3.0" | "0.3.1") {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "CHECK needs CNI 0.4.0 or later",
            format!("cniVersion is {v}"),
        ));
    }
    env.require(true).map_err(|e| e.in_version(&v))?;
    let network = read_network(&conf)?;
    let ip = match conf.prev_result.as_ref().and_then(result::prev_ip) {
        Some(ip) => ip,
        None => {
            let store = Store::new(&conf.data_dir, &conf.name);
            let locked = store.lock().map_err(store_error(&conf))?;
            locked
                .allocations()
                .map_err(store_error(&conf))?
                .into_iter()
                .find(|a| a.container_id == env.container_id && a.ifname == env.ifname)
                .map(|a| a.ip)
                .ok_or_else(|| {
                    CniError::new(
                        Code::CheckFailed,
                        "no address is recorded for this container",
                        format!("{} {}", env.container_id, env.ifname),
                    )
                    .in_version(&v)
                })?
        }
    };
    if !network.node_subnet.contains(&ip) {
        return Err(CniError::new(
            Code::CheckFailed,
            "the pod address is outside the node subnet",
            format!("{ip} is not in {}", network.node_subnet),
        )
        .in_version(&v));
    }
    let pod =
        dataplane::pod_handle(Path::new(&env.netns)).map_err(|e| dataplane_error(&conf, e))?;
    let host = crate::netns::handle_here().map_err(|e| dataplane_error(&conf, e.into()))?;
    let spec = PodSpec {
        netns: PathBuf::from(&env.netns),
        ifname: env.ifname.clone(),
        host_if: env.host_interface(),
        ip,
        mtu: if conf.mtu != 0 { conf.mtu } else { network.mtu },
    };
    dataplane::check(&host, &pod, &spec)
        .await
        .map_err(|e| dataplane_error(&conf, e))
}

/// STATUS (CNI 1.1): ready once canal-agent has written network.json.
fn status(stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    read_network(&conf).map(drop).map_err(|e| {
        if e.code == Code::TryAgainLater as u32 {
            CniError {
                code: Code::NotAvailable as u32,
                ..e
            }
        } else {
            e
        }
    })
}

/// GC (CNI 1.1): releases every address whose attachment is not listed as
/// valid.
fn gc(stdin: &[u8]) -> Result<(), CniError> {
    let conf = NetConf::parse(stdin)?;
    let Some(valid) = &conf.valid_attachments else {
        return Ok(());
    };
    let store = Store::new(&conf.data_dir, &conf.name);
    if !store.dir().exists() {
        return Ok(());
    }
    let locked = store.lock().map_err(store_error(&conf))?;
    for a in locked.allocations().map_err(store_error(&conf))? {
        let keep = valid
            .iter()
            .any(|v| v.container_id == a.container_id && v.ifname == a.ifname);
        if !keep {
            eprintln!(
                "canal-cni GC: releasing {} of {} {}",
                a.ip, a.container_id, a.ifname
            );
            locked.remove(a.ip).map_err(store_error(&conf))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> CniEnv {
        CniEnv {
            command: command.into(),
            ..CniEnv::default()
        }
    }

    fn run(env: &CniEnv, stdin: &str) -> (i32, serde_json::Value) {
        let mut out = Vec::new();
        let code = main_with(env, stdin.as_bytes(), &mut out);
        let doc = if out.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&out).unwrap()
        };
        (code, doc)
    }

    #[test]
    fn version_lists_supported_versions() {
        let (code, doc) = run(&env("VERSION"), "");
        assert_eq!(code, 0);
        assert!(
            doc["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&"1.0.0".into())
        );
    }

    #[test]
    fn unknown_command_is_a_cni_error() {
        let (code, doc) = run(&env("FROB"), "");
        assert_eq!(code, 1);
        assert_eq!(doc["code"], 4);
    }

    #[test]
    fn gc_releases_what_is_not_valid_and_status_needs_the_network_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = |extra: &str| {
            format!(
                r#"{{"cniVersion":"1.1.0","name":"net","type":"canal-cni","runDir":"{0}/run","dataDir":"{0}/data"{extra}}}"#,
                dir.path().display()
            )
        };
        let store = Store::new(&dir.path().join("data"), "net");
        {
            let l = store.lock().unwrap();
            l.reserve("10.244.1.2".parse().unwrap(), "keep", "eth0")
                .unwrap();
            l.reserve("10.244.1.3".parse().unwrap(), "gone", "eth0")
                .unwrap();
        }
        let (code, _) = run(
            &env("GC"),
            &conf(r#","cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]"#),
        );
        assert_eq!(code, 0);
        let left: Vec<_> = store.lock().unwrap().allocations().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].container_id, "keep");

        let (code, doc) = run(&env("STATUS"), &conf(""));
        assert_eq!((code, doc["code"].as_u64()), (1, Some(50)));
        RunDir::new(dir.path().join("run"))
            .write_network(&NetworkFile {
                cluster_cidr: "10.244.0.0/16".parse().unwrap(),
                node_subnet: "10.244.1.0/24".parse().unwrap(),
                mtu: 1450,
                node_name: "n".into(),
                node_ip: None,
            })
            .unwrap();
        assert_eq!(run(&env("STATUS"), &conf("")).0, 0);
    }
}
