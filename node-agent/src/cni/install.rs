//! `canal-cni install`: what the chart's init container runs. Copies the
//! running binary into the CNI bin directory and writes the conflist
//! (canal-cni, then portmap as canal.yaml chains them), both atomically, so
//! the container runtime never sees a half-written file.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::runfiles::{RunFileError, write_atomic};

/// The name of the network in the conflist (Calico's, as in canal.yaml).
pub const NETWORK_NAME: &str = "k8s-pod-network";
/// The plugin type (= the binary's name in the CNI bin directory).
pub const PLUGIN_TYPE: &str = "canal-cni";

/// Options of `canal-cni install` (its command-line flags).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct InstallOptions {
    /// CNI plugin directory on the host.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// CNI configuration directory on the host.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// canal-agent's run directory (network.json).
    #[arg(long, env = "CANAL_RUN_DIR", default_value = "/run/canal")]
    pub run_dir: PathBuf,
    /// Where pod address allocations are recorded.
    #[arg(long, env = "CANAL_CNI_DATA_DIR", default_value = "/var/lib/cni/canal")]
    pub data_dir: PathBuf,
    /// File name of the conflist.
    #[arg(long, env = "CNI_CONF_NAME", default_value = "10-canal.conflist")]
    pub conflist_name: String,
    /// Pod MTU; 0 uses canal-agent's.
    #[arg(long, env = "CNI_MTU", default_value_t = 0)]
    pub mtu: u32,
    /// Another plugin binary the conflist chains (portmap), copied into
    /// the bin directory when the host has none of that name (a host's own
    /// plugins, managed by its distribution, are left alone). Repeatable.
    #[arg(long = "extra-plugin", value_name = "PATH")]
    pub extra_plugins: Vec<PathBuf>,
}

/// Installation failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A plugin binary to install could not be read.
    #[error("reading the plugin binary {path}: {source}")]
    ReadSelf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error(transparent)]
    Write(#[from] RunFileError),
}

/// The conflist document. Pure.
pub fn conflist(opts: &InstallOptions) -> Value {
    json!({
        "name": NETWORK_NAME,
        "cniVersion": "1.0.0",
        "plugins": [
            {
                "type": PLUGIN_TYPE,
                "runDir": opts.run_dir,
                "dataDir": opts.data_dir,
                "mtu": opts.mtu,
                "policyWaitSeconds": super::config::DEFAULT_POLICY_WAIT_SECONDS,
            },
            {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
        ],
    })
}

/// Installs `binary` (normally the running executable) and the conflist.
/// Returns the two paths written.
pub fn install(opts: &InstallOptions, binary: &Path) -> Result<(PathBuf, PathBuf), InstallError> {
    let bytes = std::fs::read(binary).map_err(|source| InstallError::ReadSelf {
        path: binary.to_path_buf(),
        source,
    })?;
    let bin = opts.cni_bin_dir.join(PLUGIN_TYPE);
    write_atomic(&bin, &bytes, 0o755)?;
    for plugin in &opts.extra_plugins {
        let Some(name) = plugin.file_name() else {
            continue;
        };
        let target = opts.cni_bin_dir.join(name);
        if target.exists() {
            continue;
        }
        let bytes = std::fs::read(plugin).map_err(|source| InstallError::ReadSelf {
            path: plugin.clone(),
            source,
        })?;
        write_atomic(&target, &bytes, 0o755)?;
    }
    let conf = opts.cni_conf_dir.join(&opts.conflist_name);
    let mut text = serde_json::to_vec_pretty(&conflist(opts)).unwrap_or_default();
    text.push(b'\n');
    write_atomic(&conf, &text, 0o600)?;
    Ok((bin, conf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(root: &Path) -> InstallOptions {
        InstallOptions {
            cni_bin_dir: root.join("bin"),
            cni_conf_dir: root.join("net.d"),
            run_dir: "/run/canal".into(),
            data_dir: "/var/lib/cni/canal".into(),
            conflist_name: "10-canal.conflist".into(),
            mtu: 0,
            extra_plugins: vec![],
        }
    }

    #[test]
    fn conflist_chains_canal_then_portmap() {
        let doc = conflist(&opts(Path::new("/x")));
        assert_eq!(
            doc,
            json!({
                "name": "k8s-pod-network",
                "cniVersion": "1.0.0",
                "plugins": [
                    {"type": "canal-cni", "runDir": "/run/canal", "dataDir": "/var/lib/cni/canal", "mtu": 0, "policyWaitSeconds": 10.0},
                    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
                ],
            })
        );
        // The canal-cni entry, completed as a runtime does, is a valid config.
        let mut plugin = doc["plugins"][0].clone();
        plugin["name"] = doc["name"].clone();
        plugin["cniVersion"] = doc["cniVersion"].clone();
        crate::cni::config::NetConf::parse(plugin.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn installs_binary_and_conflist() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("canal-cni-build");
        std::fs::write(&fake, b"#!/bin/true\n").unwrap();
        let (bin, conf) = install(&opts(dir.path()), &fake).unwrap();
        assert_eq!(std::fs::read(&bin).unwrap(), b"#!/bin/true\n");
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let doc: Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
        assert_eq!(doc["plugins"][1]["type"], "portmap");
        // Idempotent.
        install(&opts(dir.path()), &fake).unwrap();
    }

    #[test]
    fn extra_plugins_are_copied_only_when_the_host_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("canal-cni-build");
        std::fs::write(&fake, b"canal").unwrap();
        let portmap = dir.path().join("portmap");
        std::fs::write(&portmap, b"ours").unwrap();
        let mut o = opts(dir.path());
        o.extra_plugins = vec![portmap.clone()];
        install(&o, &fake).unwrap();
        assert_eq!(
            std::fs::read(o.cni_bin_dir.join("portmap")).unwrap(),
            b"ours"
        );
        // The host's own portmap is left alone.
        std::fs::write(o.cni_bin_dir.join("portmap"), b"host").unwrap();
        install(&o, &fake).unwrap();
        assert_eq!(
            std::fs::read(o.cni_bin_dir.join("portmap")).unwrap(),
            b"host"
        );
        // A missing source is an error naming it.
        o.extra_plugins = vec![dir.path().join("nope")];
        std::fs::remove_file(o.cni_bin_dir.join("portmap")).unwrap();
        let err = install(&o, &fake).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
