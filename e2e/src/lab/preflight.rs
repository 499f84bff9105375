//! What `canal-lab up` checks before it starts anything, so that what cannot
//! work fails within a second with one line naming the fix, instead of an
//! agent that never gets ready two minutes later: root and the capabilities
//! the lab uses, network namespaces, VXLAN, iptables and ipset in a fresh
//! namespace, the commands of `scripts/packages` (compiled in, so the fix
//! names the Debian package), canal's own binaries, and Go when the test
//! control plane still has to be built.
//!
//! The kernel checks run on a thread of their own that `unshare(2)`s a new
//! network namespace: the commands it spawns run in that namespace, which
//! disappears with the thread. Nothing in the root namespace changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries::{self, KUBERNETES_VERSION};
use crate::lab::pods::SYSTEM_CNI_DIRS;

/// `scripts/packages`: the Debian packages and the commands the lab needs
/// from them (the same list the scripts install).
pub const PACKAGES: &str = include_str!("../../../scripts/packages");

/// One thing that cannot work, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.problem, self.fix)
    }
}

fn failure(problem: impl Into<String>, fix: impl Into<String>) -> Failure {
    Failure {
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// What the lab about to start needs.
#[derive(Debug, Clone)]
pub struct Needs {
    /// Where canal's binaries are.
    pub bin_dir: PathBuf,
    /// canal-agent and canal-cni run (iptables, ipset, VXLAN).
    pub agents: bool,
    /// canal-controller runs.
    pub controller: bool,
}

/// A command the lab needs and the package that provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// A program on PATH, or `cni:NAME` for a CNI plugin.
    pub command: String,
    /// The Debian package.
    pub package: String,
}

/// Parses `scripts/packages`: `package [command...] [# why]` a line.
pub fn parse_packages(text: &str) -> Vec<Tool> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let package = words.next()?;
            Some(words.map(move |command| Tool {
                command: command.to_string(),
                package: package.to_string(),
            }))
        })
        .flatten()
        .collect()
}

/// The Debian package names of `scripts/packages`.
pub fn package_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split('#').next()?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether `command` is an executable file in one of the `path` directories.
pub fn on_path(command: &str, path: &str) -> bool {
    std::env::split_paths(path).any(|dir| is_executable(&dir.join(command)))
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The commands of `tools` that cannot be found (`path`: the PATH to search).
pub fn missing_tools(tools: &[Tool], path: &str, cni_dirs: &[&str]) -> Vec<Failure> {
    tools
        .iter()
        .filter(|t| match t.command.strip_prefix("cni:") {
            Some(plugin) => !cni_dirs
                .iter()
                .any(|d| is_executable(&Path::new(d).join(plugin))),
            None => !on_path(&t.command, path),
        })
        .map(|t| match t.command.strip_prefix("cni:") {
            Some(plugin) => failure(
                format!(
                    "the CNI plugin {plugin} is in none of {}",
                    cni_dirs.join(", ")
                ),
                format!("apt-get install {}", t.package),
            ),
            None => failure(
                format!("{} is not on PATH", t.command),
                format!("apt-get install {}", t.package),
            ),
        })
        .collect()
}

/// Capabilities the lab uses as root (bit numbers of capability.h).
const CAPABILITIES: [(u32, &str); 3] = [
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (21, "CAP_SYS_ADMIN"),
];

/// The capabilities of [`CAPABILITIES`] missing from a `/proc/<pid>/status`.
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    CAPABILITIES
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Runs every check; empty when the lab can start.
pub fn check(needs: &Needs) -> Vec<Failure> {
    let mut failures = Vec::new();
    let privileged = check_privileges(&mut failures);
    let path = std::env::var("PATH").unwrap_or_default();
    let tools = parse_packages(PACKAGES);
    failures.extend(missing_tools(&tools, &path, &SYSTEM_CNI_DIRS));
    // The kernel checks need the privileges and the tools they run (a
    // missing tool is reported above).
    let have = |cmd: &str| on_path(cmd, &path);
    if privileged && have("ip") {
        failures.extend(check_kernel(
            needs.agents,
            have("iptables") && have("ipset"),
        ));
    }
    failures.extend(check_binaries(needs));
    failures.extend(check_go());
    failures
}

fn check_privileges(failures: &mut Vec<Failure>) -> bool {
    if nix::unistd::geteuid().as_raw() != 0 {
        failures.push(failure(
            "canal-lab up must run as root (network namespaces, iptables)",
            "run it with sudo, or as root",
        ));
        return false;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_capabilities(&status);
    if !missing.is_empty() {
        failures.push(failure(
            format!(
                "running as root without {} (an unprivileged container?)",
                missing.join(", ")
            ),
            "run on the host, in a VM, or in a privileged container (docker run --privileged)",
        ));
        return false;
    }
    true
}

/// Network namespaces, VXLAN and (with agents) iptables and ipset, inside a
/// namespace of a thread of its own.
fn check_kernel(agents: bool, netfilter_tools: bool) -> Vec<Failure> {
    let run = move || -> Vec<Failure> {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            return vec![failure(
                format!("cannot create a network namespace (unshare: {e})"),
                "use a kernel with network namespaces (CONFIG_NET_NS) and run as root on the host or in a privileged container",
            )];
        }
        let mut failures = Vec::new();
        // Children spawned from this thread start in its new namespace.
        if let Err(detail) = run_here(
            "ip",
            &[
                "link",
                "add",
                "canal-preflight",
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                "4789",
            ],
        ) {
            let fix = if detail.contains("not permitted") {
                "run as root with CAP_NET_ADMIN (on the host or in a privileged container)"
            } else {
                "load the vxlan module (modprobe vxlan; it ships with the kernel: linux-image-* or linux-modules-extra-*)"
            };
            failures.push(failure(
                format!("the kernel cannot create a VXLAN device ({detail})"),
                fix,
            ));
        }
        if agents && netfilter_tools {
            if let Err(detail) = run_here("iptables", &["-w", "5", "-t", "filter", "-S"]) {
                failures.push(failure(
                    format!("iptables does not work in a new network namespace ({detail})"),
                    "load the kernel's netfilter modules (modprobe nf_tables, or ip_tables for iptables-legacy)",
                ));
            }
            if let Err(detail) = run_here("ipset", &["list", "-n"]) {
                failures.push(failure(
                    format!("ipset does not work in a new network namespace ({detail})"),
                    "load the kernel's ip_set module (modprobe ip_set)",
                ));
            }
        }
        failures
    };
    std::thread::Builder::new()
        .name("preflight-netns".into())
        .spawn(run)
        .map_err(|e| vec![failure(format!("starting a thread: {e}"), "retry")])
        .and_then(|t| {
            t.join()
                .map_err(|_| vec![failure("the kernel checks panicked", "report a bug")])
        })
        .unwrap_or_else(|f| f)
}

fn run_here(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default().trim();
        Err(format!("{program} {}: {first}", args.join(" ")))
    }
}

fn check_binaries(needs: &Needs) -> Vec<Failure> {
    let mut wanted = vec!["canal-lab"];
    if needs.controller {
        wanted.push("canal-controller");
    }
    if needs.agents {
        wanted.extend(["canal-agent", "canal-cni"]);
    }
    let missing: Vec<&str> = wanted
        .into_iter()
        .filter(|b| !needs.bin_dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        return vec![];
    }
    vec![failure(
        format!(
            "{} not found in {}",
            missing.join(", "),
            needs.bin_dir.display()
        ),
        "run `cargo build --workspace --bins` (or ./scripts/lab up, which builds everything), or set CANAL_BIN_DIR",
    )]
}

/// Go, only when the control-plane binaries still have to be built.
fn check_go() -> Vec<Failure> {
    let dir = binaries::cache_dir();
    if ["kube-apiserver", "etcd", "kubectl"]
        .iter()
        .all(|b| dir.join(b).is_file())
    {
        return vec![];
    }
    let path = std::env::var("PATH").unwrap_or_default();
    if on_path("go", &path) {
        return vec![];
    }
    vec![failure(
        format!(
            "kube-apiserver, etcd and kubectl {KUBERNETES_VERSION} are not built yet (in {}) and Go is not on PATH",
            dir.display()
        ),
        "install Go >= 1.26 from https://go.dev/dl/ and put its bin directory on PATH (the first up then builds them once, about 10 minutes)",
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_file_gives_commands_and_names() {
        let text = "# comment\n\
                    iproute2   ip bridge   # links\n\
                    kmod                   # no command\n\
                    \n\
                    containernetworking-plugins cni:portmap\n";
        assert_eq!(
            parse_packages(text),
            vec![
                Tool {
                    command: "ip".into(),
                    package: "iproute2".into()
                },
                Tool {
                    command: "bridge".into(),
                    package: "iproute2".into()
                },
                Tool {
                    command: "cni:portmap".into(),
                    package: "containernetworking-plugins".into()
                },
            ]
        );
        assert_eq!(
            package_names(text),
            ["iproute2", "kmod", "containernetworking-plugins"]
        );
    }

    #[test]
    fn the_real_packages_file_checks_the_agents_tools() {
        let tools = parse_packages(PACKAGES);
        for (command, package) in [
            ("ip", "iproute2"),
            ("iptables-restore", "iptables"),
            ("ipset", "ipset"),
            ("cni:portmap", "containernetworking-plugins"),
        ] {
            assert!(
                tools
                    .iter()
                    .any(|t| t.command == command && t.package == package),
                "{command} from {package} missing in scripts/packages"
            );
        }
        assert!(package_names(PACKAGES).contains(&"nftables".to_string()));
    }

    #[test]
    fn missing_tools_name_their_package() {
        let dir = tempfile::tempdir().unwrap();
        let ip = dir.path().join("ip");
        std::fs::write(&ip, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ip, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Not executable: does not count.
        std::fs::write(dir.path().join("ipset"), "").unwrap();
        let tools = parse_packages("iproute2 ip\nipset ipset\nplugins cni:portmap\n");
        let path = format!("/nonexistent:{}", dir.path().display());
        let lines: Vec<String> = missing_tools(&tools, &path, &[dir.path().to_str().unwrap()])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "ipset is not on PATH: apt-get install ipset".to_string(),
                format!(
                    "the CNI plugin portmap is in none of {}: apt-get install plugins",
                    dir.path().display()
                ),
            ]
        );
    }

    #[test]
    fn capabilities_from_proc_status() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert!(missing_capabilities(root).is_empty());
        // Docker's default set: no CAP_NET_ADMIN, no CAP_SYS_ADMIN.
        let docker = "CapEff:\t00000000a80425fb\n";
        assert_eq!(
            missing_capabilities(docker),
            ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
        );
        assert_eq!(missing_capabilities("").len(), 3);
    }
}
