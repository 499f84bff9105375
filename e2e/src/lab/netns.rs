//! Network namespaces and links, through iproute2 (as a person would inspect
//! them) and `setns(2)` on a dedicated thread (for sockets that must live in
//! a namespace: probes, the forwarder's listeners).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// Where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Runs `ip ARGS...` and returns its standard output.
pub fn ip(args: &[&str]) -> Result<String, Error> {
    run(Command::new("ip").args(args))
}

/// Runs a command; an error carries its stderr.
pub fn run(cmd: &mut Command) -> Result<String, Error> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| Error::Io(format!("running {shown}"), e))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The file that pins a named namespace (`CNI_NETNS` for a pod).
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Whether a named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Every named network namespace.
pub fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Creates a named namespace with its loopback up.
pub fn add(name: &str) -> Result<(), Error> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Removes a named namespace; a missing one is not an error.
pub fn delete(name: &str) -> Result<(), Error> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name]).map(|_| ())
}

/// Processes whose network namespace is `name`.
pub fn pids(name: &str) -> Vec<i32> {
    ip(&["netns", "pids", name])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// `ip netns exec <name> <program>`: a command that runs inside `name`.
pub fn exec(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", name]).arg(program);
    cmd
}

thread_local! {
    /// The named namespace this thread entered last ([`enter`]).
    static CURRENT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The named namespace the calling thread entered with [`enter`] (None: it
/// never moved). Probes use it to find their lab's UDP source ports.
pub fn current() -> Option<String> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Moves the calling thread into the namespace `name`. Only for threads the
/// lab owns (a tokio worker must never be moved).
pub fn enter(name: &str) -> Result<(), Error> {
    let file = File::open(path(name)).map_err(|e| Error::Netns {
        netns: name.to_string(),
        source: e,
    })?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| Error::Netns {
        netns: name.to_string(),
        source: std::io::Error::from(e),
    })?;
    CURRENT.with(|c| *c.borrow_mut() = Some(name.to_string()));
    Ok(())
}

/// Runs `f` on a fresh thread inside the namespace `name` and returns its
/// result. Sockets `f` creates stay in that namespace wherever they are
/// used afterwards.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let netns = name.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            enter(&netns)?;
            Ok(f())
        })
        .map_err(|e| Error::Io(format!("starting a thread for namespace {name}"), e))?
        .join()
        .map_err(|_| Error::Lab(format!("a thread inside namespace {name} panicked")))?
}

/// Sets a sysctl under `/proc/sys/net/...` inside a namespace (those files
/// show the namespace of the thread that opens them).
pub fn set_sysctl(name: &str, key: &str, value: &str) -> Result<(), Error> {
    let file = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let value = value.to_string();
    run_in(name, move || {
        std::fs::write(&file, value).map_err(|e| (file, e))
    })?
    .map_err(|(file, e)| Error::Io(format!("setting {} in namespace {name}", file.display()), e))
}

/// Creates a veth pair with one end in each namespace, both up.
pub fn veth(a_netns: &str, a_name: &str, b_netns: &str, b_name: &str) -> Result<(), Error> {
    ip(&[
        "-n", a_netns, "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns",
        b_netns,
    ])?;
    ip(&["-n", a_netns, "link", "set", a_name, "up"])?;
    ip(&["-n", b_netns, "link", "set", b_name, "up"])?;
    Ok(())
}
