//! The lab's CNI runtime: what containerd's libcni does for the kubelet.
//! Picks a node's network configuration, builds each plugin's stdin
//! (name, cniVersion, prevResult, runtimeConfig), runs the chain with the
//! real CNI environment inside the node's namespace, and parses results and
//! errors. The configuration building is pure and unit-tested.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::Error;
use crate::lab::netns;

/// How long one plugin may run (canal-cni may wait up to its
/// `policyWaitSeconds` for the agent).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A network configuration list (`*.conflist`; a single `*.conf` becomes a
/// list of one).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    /// `cniVersion`.
    pub cni_version: String,
    /// `name`.
    pub name: String,
    /// Each plugin's configuration object, in order.
    pub plugins: Vec<Map<String, Value>>,
}

/// A CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    /// Set the container up.
    Add,
    /// Tear it down.
    Del,
    /// Check it.
    Check,
}

impl CniCommand {
    fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
        }
    }
}

/// Parses a configuration file's text.
pub fn parse_conf(text: &str, is_list: bool) -> Result<ConfList, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut obj) = value else {
        return Err("not a JSON object".into());
    };
    let take_string = |obj: &Map<String, Value>, key: &str| {
        obj.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("missing string {key:?}"))
    };
    let cni_version = take_string(&obj, "cniVersion")?;
    let name = take_string(&obj, "name")?;
    let plugins = if is_list {
        match obj.remove("plugins") {
            Some(Value::Array(items)) if !items.is_empty() => items
                .into_iter()
                .map(|p| match p {
                    Value::Object(m) if m.get("type").and_then(Value::as_str).is_some() => Ok(m),
                    _ => Err("every plugin needs a string \"type\"".to_string()),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err("\"plugins\" must be a non-empty list".into()),
        }
    } else {
        if obj.get("type").and_then(Value::as_str).is_none() {
            return Err("missing string \"type\"".into());
        }
        vec![obj]
    };
    Ok(ConfList {
        cni_version,
        name,
        plugins,
    })
}

/// The configuration the container runtime uses from a directory: the first
/// `*.conflist`, `*.conf` or `*.json` in lexical order (as containerd does).
pub fn load_conf_dir(dir: &Path) -> Result<(PathBuf, ConfList), Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| {
            Error::Io(
                format!("reading CNI configuration dir {}", dir.display()),
                e,
            )
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    let Some(file) = files.into_iter().next() else {
        return Err(Error::Lab(format!(
            "no CNI configuration in {} (canal-cni install writes one when the node's agent is set up)",
            dir.display()
        )));
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| Error::Io(format!("reading {}", file.display()), e))?;
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist");
    let list = parse_conf(&text, is_list)
        .map_err(|e| Error::Lab(format!("CNI configuration {}: {e}", file.display())))?;
    Ok((file, list))
}

/// The stdin of plugin `index` of `list`: its own object plus the list's
/// name and cniVersion, the previous result, and the runtime config entries
/// for the capabilities it declares.
pub fn plugin_config(
    list: &ConfList,
    index: usize,
    prev_result: Option<&Value>,
    runtime_config: &Map<String, Value>,
) -> Value {
    let mut conf = list.plugins[index].clone();
    conf.insert("cniVersion".into(), json!(list.cni_version));
    conf.insert("name".into(), json!(list.name));
    let wanted: Map<String, Value> = conf
        .get("capabilities")
        .and_then(Value::as_object)
        .map(|caps| {
            caps.iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .filter_map(|(cap, _)| runtime_config.get(cap).map(|v| (cap.clone(), v.clone())))
                .collect()
        })
        .unwrap_or_default();
    if !wanted.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(wanted));
    }
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    Value::Object(conf)
}

/// `CNI_ARGS`: `IgnoreUnknown=1;K=V;...`.
pub fn cni_args(pairs: &[(&str, &str)]) -> String {
    std::iter::once("IgnoreUnknown=1".to_string())
        .chain(pairs.iter().map(|(k, v)| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(";")
}

/// The addresses in a CNI result (`ips[].address`, prefix length dropped).
pub fn result_ips(result: &Value) -> Vec<std::net::IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .filter_map(|a| a.split('/').next().and_then(|a| a.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// One invocation of the chain for one container.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The node namespace the plugins run in (the "host").
    pub node_netns: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns_path: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
    /// `CNI_PATH`.
    pub cni_path: Vec<PathBuf>,
    /// Who it is for, in error messages.
    pub pod: String,
}

/// Runs ADD through the chain and returns the final result.
pub fn add(list: &ConfList, inv: &Invocation) -> Result<Value, Error> {
    let mut prev: Option<Value> = None;
    for index in 0..list.plugins.len() {
        let conf = plugin_config(list, index, prev.as_ref(), &Map::new());
        let out = run_plugin(&conf, CniCommand::Add, inv)?;
        prev = Some(out.unwrap_or_else(|| prev.take().unwrap_or(Value::Null)));
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// Runs DEL (reverse order, each plugin given the cached ADD result).
/// Every plugin runs; the first error is returned.
pub fn del(list: &ConfList, inv: &Invocation, cached: Option<&Value>) -> Result<(), Error> {
    let mut first_error = None;
    for index in (0..list.plugins.len()).rev() {
        let conf = plugin_config(list, index, cached, &Map::new());
        if let Err(e) = run_plugin(&conf, CniCommand::Del, inv) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs CHECK through the chain with the cached ADD result.
pub fn check(list: &ConfList, inv: &Invocation, cached: &Value) -> Result<(), Error> {
    for index in 0..list.plugins.len() {
        let conf = plugin_config(list, index, Some(cached), &Map::new());
        run_plugin(&conf, CniCommand::Check, inv)?;
    }
    Ok(())
}

fn find_plugin(kind: &str, cni_path: &[PathBuf]) -> Option<PathBuf> {
    cni_path.iter().map(|d| d.join(kind)).find(|p| p.is_file())
}

/// Runs one plugin; returns its result (None for an empty stdout).
fn run_plugin(conf: &Value, command: CniCommand, inv: &Invocation) -> Result<Option<Value>, Error> {
    let kind = conf.get("type").and_then(Value::as_str).unwrap_or_default();
    let cni_error = |code: u64, msg: String, details: String| {
        Error::Cni(Box::new(crate::CniFailure {
            pod: inv.pod.clone(),
            plugin: kind.to_string(),
            command: command.as_str().to_string(),
            code,
            msg,
            details,
        }))
    };
    let plugin = find_plugin(kind, &inv.cni_path).ok_or_else(|| {
        cni_error(
            0,
            format!("plugin {kind:?} not found"),
            format!("searched {:?}", inv.cni_path),
        )
    })?;
    let cni_path = std::env::join_paths(&inv.cni_path)
        .map_err(|e| cni_error(0, "bad CNI_PATH".into(), e.to_string()))?;
    let mut cmd: Command = netns::exec(&inv.node_netns, &plugin);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", &inv.netns_path)
        .env("CNI_IFNAME", &inv.ifname)
        .env("CNI_ARGS", &inv.args)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Io(format!("running CNI plugin {}", plugin.display()), e))?;
    let stdin_bytes = conf.to_string().into_bytes();
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading its config shows up below.
        let _ = stdin.write_all(&stdin_bytes);
    }
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out);
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut err);
        }
        (out, err)
    });
    let deadline = Instant::now() + PLUGIN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(cni_error(
                    0,
                    format!("timed out after {}s", PLUGIN_TIMEOUT.as_secs()),
                    String::new(),
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Error::Io(format!("waiting for {}", plugin.display()), e)),
        }
    };
    let (out, err) = reader.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&out);
    if !status.success() {
        return Err(match serde_json::from_str::<Value>(&text) {
            Ok(doc) if doc.get("code").is_some() => cni_error(
                doc.get("code").and_then(Value::as_u64).unwrap_or(0),
                doc.get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                doc.get("details")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => cni_error(
                0,
                format!("exited with {status}"),
                format!(
                    "stdout: {} stderr: {}",
                    text.trim(),
                    String::from_utf8_lossy(&err).trim()
                ),
            ),
        });
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text).map(Some).map_err(|e| {
        cni_error(
            0,
            format!("result is not JSON: {e}"),
            text.trim().to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canal_list() -> ConfList {
        parse_conf(
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[
                {"type":"canal-cni","runDir":"/run/canal"},
                {"type":"portmap","snat":true,"capabilities":{"portMappings":true}}]}"#,
            true,
        )
        .unwrap()
    }

    #[test]
    fn lists_and_single_confs_parse() {
        let list = canal_list();
        assert_eq!(list.name, "k8s-pod-network");
        assert_eq!(list.plugins.len(), 2);
        let single = parse_conf(
            r#"{"cniVersion":"1.0.0","name":"n","type":"ptp","ipam":{}}"#,
            false,
        )
        .unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert_eq!(single.plugins[0]["type"], "ptp");
    }

    #[test]
    fn bad_confs_are_refused_with_a_reason() {
        for (text, list, why) in [
            ("nope", true, "not JSON"),
            ("[]", true, "not a JSON object"),
            (
                r#"{"name":"n","plugins":[{"type":"a"}]}"#,
                true,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                true,
                "non-empty",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#,
                true,
                "type",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, false, "type"),
        ] {
            let err = parse_conf(text, list).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn plugin_stdin_carries_name_version_and_prev_result() {
        let list = canal_list();
        let first = plugin_config(&list, 0, None, &Map::new());
        assert_eq!(first["name"], "k8s-pod-network");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["runDir"], "/run/canal");
        assert!(first.get("prevResult").is_none());

        let prev = json!({"cniVersion":"1.0.0","ips":[{"address":"10.244.1.2/32"}]});
        let second = plugin_config(&list, 1, Some(&prev), &Map::new());
        assert_eq!(second["prevResult"], prev);
        assert!(
            second.get("runtimeConfig").is_none(),
            "no port mappings asked for"
        );
    }

    #[test]
    fn runtime_config_goes_only_to_plugins_with_the_capability() {
        let list = canal_list();
        let mut rc = Map::new();
        rc.insert(
            "portMappings".into(),
            json!([{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]),
        );
        rc.insert("bandwidth".into(), json!({}));
        assert!(
            plugin_config(&list, 0, None, &rc)
                .get("runtimeConfig")
                .is_none()
        );
        let portmap = plugin_config(&list, 1, None, &rc);
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]})
        );
    }

    #[test]
    fn args_and_ips() {
        assert_eq!(
            cni_args(&[("K8S_POD_NAMESPACE", "x"), ("K8S_POD_NAME", "a")]),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"
        );
        let result = json!({"ips":[{"address":"10.244.1.2/32"},{"address":"fd00::2/128"}]});
        assert_eq!(
            result_ips(&result),
            vec![
                "10.244.1.2".parse::<std::net::IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        assert!(result_ips(&json!({})).is_empty());
    }
}
