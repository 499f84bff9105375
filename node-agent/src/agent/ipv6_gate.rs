//! Fail closed for pods that already have IPv6. canal-cni gives a new pod
//! IPv6 only while [`crate::runfiles::ipv6_for_pods`] allows it; when that
//! changes under running pods (NetworkPolicy enabled live on a node whose
//! policy component does not guard IPv6), their IPv6 would bypass every
//! rule. So on every sync the agent turns IPv6 off on each pod's host veth
//! (`cali…`) while it is not allowed: the kernel then drops the pod's IPv6
//! at the node, and removes the veth's IPv6 addresses and routes. The pods
//! keep IPv4; a pod gets IPv6 back when it is re-created (its repeated ADD
//! reconfigures it) after IPv6 is allowed again.
//!
//! The decision is the CNI's rule, with `policy-enabled` also taken as set
//! while the CanalNetwork in effect says `policy.enabled` (the file appears
//! only after the policy component's first sync; the gate must not wait
//! for it).

use std::path::Path;

use crate::runfiles::{RunDir, ipv6_for_pods};

/// Where the IPv6 device settings of the agent's namespace live.
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Whether pods may have IPv6 on this node now.
pub fn ipv6_allowed(run_dir: &RunDir, policy_enabled: bool) -> Result<bool, String> {
    let families = match std::fs::read_to_string(run_dir.policy_families_file()) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(format!(
                "reading {}: {e}",
                run_dir.policy_families_file().display()
            ));
        }
    };
    let enabled = policy_enabled || run_dir.policy_enabled_file().exists();
    ipv6_for_pods(enabled, families.as_deref())
}

/// The pod host veths (canal's `cali` prefix) that have IPv6 on, under
/// `conf` (a `/proc/sys/net/ipv6/conf` directory).
pub fn enabled_pod_veths(conf: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(conf)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(canal_crds::names::VETH_PREFIX) {
            continue;
        }
        let disabled = std::fs::read_to_string(entry.path().join("disable_ipv6"))
            .map(|v| v.trim() == "1")
            // Gone meanwhile: nothing to close.
            .unwrap_or(true);
        if !disabled {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Turns IPv6 off on every pod veth under `conf` that has it; returns
/// their names. Stops at nothing: every veth is tried, the failures are
/// returned as one message.
pub fn close(conf: &Path) -> Result<Vec<String>, String> {
    let open = enabled_pod_veths(conf).map_err(|e| format!("listing {}: {e}", conf.display()))?;
    let mut closed = Vec::new();
    let mut errors = Vec::new();
    for name in open {
        let path = conf.join(&name).join("disable_ipv6");
        match std::fs::write(&path, "1") {
            Ok(()) => closed.push(name),
            // The pod went meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    if errors.is_empty() {
        Ok(closed)
    } else {
        Err(format!(
            "turning IPv6 off on pod interfaces failed: {}",
            errors.join("; ")
        ))
    }
}

/// [`close`] on the agent's own namespace.
pub fn close_here() -> Result<Vec<String>, String> {
    close(Path::new(IPV6_CONF))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_conf(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in entries {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("disable_ipv6"), value).unwrap();
        }
        dir
    }

    #[test]
    fn only_pod_veths_with_ipv6_on_are_closed() {
        let dir = fake_conf(&[
            ("cali0123456789a", "0\n"),
            ("cali0123456789b", "1\n"),
            ("eth0", "0\n"),
            ("flannel-v6.1", "0\n"),
            ("all", "0\n"),
        ]);
        assert_eq!(
            enabled_pod_veths(dir.path()).unwrap(),
            vec!["cali0123456789a"]
        );
        assert_eq!(close(dir.path()).unwrap(), vec!["cali0123456789a"]);
        assert!(enabled_pod_veths(dir.path()).unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("eth0/disable_ipv6")).unwrap(),
            "0\n",
            "the node's own interfaces are never touched"
        );
        assert!(close(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn the_gate_follows_the_cni_rule_and_the_config_in_effect() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        assert_eq!(ipv6_allowed(&run, false), Ok(true));
        // policy.enabled in the CanalNetwork, before the policy component
        // wrote its file: already closed.
        assert_eq!(ipv6_allowed(&run, true), Ok(false));
        std::fs::write(run.policy_families_file(), "ipv4,ipv6\n").unwrap();
        assert_eq!(ipv6_allowed(&run, true), Ok(true));
        std::fs::write(run.policy_families_file(), "ipv4\n").unwrap();
        assert_eq!(ipv6_allowed(&run, false), Ok(false));
        std::fs::write(run.policy_families_file(), "bogus\n").unwrap();
        assert!(ipv6_allowed(&run, false).is_err());
    }
}
