//! canal-cni, the CNI plugin (spec 1.0.0; STATUS and GC of 1.1.0): ADD wires
//! a pod with a veth pair and an address from the node subnet canal-agent
//! wrote to `<runDir>/network.json`; DEL undoes it; CHECK verifies it. The
//! plugin never talks to the API server. [`config`], [`ipam::decide`],
//! [`ownership`] and [`result`] decide; [`commands`] runs them under the
//! attachment's [`lock`], and [`dataplane`], [`sandbox`] and the IPAM
//! store do the I/O.

mod commands;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod install;
pub mod ipam;
pub mod lock;
pub mod ownership;
pub mod result;
pub mod sandbox;

use std::io::Write;

use commands::{add, check, del, gc, status};
use config::{CniEnv, SUPPORTED_VERSIONS};
use error::{CniError, Code};

/// Runs one CNI invocation; writes the result or error document to `out` and
/// returns the process exit code.
pub fn main_with(env: &CniEnv, stdin: &[u8], out: &mut impl Write) -> i32 {
    let result = match env.command.as_str() {
        "VERSION" => Ok(Some(version_document())),
        "ADD" => run_async(|| add(env, stdin)).map(Some),
        "DEL" => run_async(|| del(env, stdin)).map(|()| None),
        "CHECK" => run_async(|| check(env, stdin)).map(|()| None),
        "STATUS" => status(stdin).map(|()| None),
        "GC" => run_async(|| gc(env, stdin)).map(|()| None),
        // A runtime always sets it; without it this is not a CNI call, but
        // the answer is still a CNI error document (and exit status 1).
        "" => Err(CniError::new(
            Code::InvalidEnvironment,
            "CNI_COMMAND is not set",
            "canal-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND (ADD, DEL, CHECK, VERSION, STATUS or GC) and the network configuration on stdin; `canal-cni --help` shows its other uses",
        )),
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
    fn unknown_or_missing_command_is_a_cni_error() {
        let (code, doc) = run(&env("FROB"), "");
        assert_eq!(code, 1);
        assert_eq!(doc["code"], 4);
        let (code, doc) = run(&env(""), "");
        assert_eq!((code, doc["code"].as_u64()), (1, Some(4)));
        assert!(doc["msg"].as_str().unwrap().contains("CNI_COMMAND"));
    }

    fn l_path(store: &ipam::Store, ip: &str) -> std::path::PathBuf {
        store.dir().join(ip)
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
        let store = ipam::Store::new(&dir.path().join("data"), "net");
        {
            // Records without a host interface: GC releases them without
            // touching the kernel.
            let l = store.lock().unwrap();
            std::fs::write(l_path(&store, "10.244.1.2"), "keep\neth0\n").unwrap();
            std::fs::write(l_path(&store, "10.244.1.3"), "gone\neth0\n").unwrap();
            drop(l);
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
        crate::runfiles::RunDir::new(dir.path().join("run"))
            .write_network(&crate::runfiles::NetworkFile {
                cluster_cidr: "10.244.0.0/16".parse().unwrap(),
                node_subnet: "10.244.1.0/24".parse().unwrap(),
                mtu: 1450,
                node_name: "n".into(),
                node_ip: None,
                families: Vec::new(),
            })
            .unwrap();
        assert_eq!(run(&env("STATUS"), &conf("")).0, 0);
    }
}
