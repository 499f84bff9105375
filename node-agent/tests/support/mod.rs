//! Test support: throwaway network namespaces (removed on drop, also when a
//! test panics), unique names, `ip` helpers and condition waits. The
//! policy tests use [`netns`]; the overlay and CNI tests the helpers here.
#![allow(dead_code)]

pub mod cluster;
pub mod netns;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `<prefix><pid%100000><n>`,
/// kept under 15 characters so it also works as an interface name.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace the test created; deleted on drop.
pub struct Netns {
    /// Its name under /var/run/netns.
    pub name: String,
}

impl Netns {
    /// Creates `<prefix>…` with loopback up.
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <name> ARGS`, panicking on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip netns exec <name> PROGRAM ARGS` as a Command to adjust and run.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs a program in the namespace, panicking on failure; returns stdout.
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        run(self.exec(program).args(args))
    }

    /// Runs a program in the namespace and returns its full output.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.exec(program)
            .args(args)
            .output()
            .expect("ip netns exec runs")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes left inside (a failed test's agent) would keep it alive.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|out| {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Polls `check` until it returns Ok or `timeout` passes; the panic message
/// shows the last observed value and what was expected.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(observed) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last observed:\n{observed}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Async variant of [`wait_until`].
pub async fn wait_until_async<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(observed) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last observed:\n{observed}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path`
/// (sockets it creates belong to that namespace).
pub fn in_netns<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP forwarder: listens on 127.0.0.1 inside a namespace and forwards to
/// 127.0.0.1:`target` in the test's own namespace (a process inside a
/// network namespace cannot reach the root namespace's loopback, where the
/// test API server listens). Runs until the test process ends.
pub fn forward_into(ns: &Netns, target: u16) -> u16 {
    let listener = in_netns(&ns.path(), || {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind in netns")
    });
    let port = listener.local_addr().unwrap().port();
    // Threads spawned from here live in the test's namespace.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(inbound) = conn else { continue };
            std::thread::spawn(move || {
                let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    return;
                };
                let (mut a, mut b) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                let (mut a, mut b) = (outbound, inbound);
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    port
}

/// An HTTP GET to `127.0.0.1:port` inside a namespace; returns the response.
pub fn http_get_in(ns: &Netns, port: u16, path: &str) -> Result<String, String> {
    let path = path.to_string();
    in_netns(&ns.path(), move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
}

/// A process the test started; killed on drop.
pub struct Child {
    /// The process.
    pub child: std::process::Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Child {
    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops it (SIGKILL, as a crash or an OOM kill would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs canal-cni under `ip netns exec <node>` with the CNI environment;
/// returns (exit code, stdout document, stderr).
pub fn cni(
    node: &Netns,
    command: &str,
    container: &str,
    pod_netns: &std::path::Path,
    pod: (&str, &str),
    conf: &serde_json::Value,
) -> (i32, serde_json::Value, String) {
    use std::io::Write;
    let mut cmd = node.exec(env!("CARGO_BIN_EXE_canal-cni"));
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", pod_netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                pod.0, pod.1
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("canal-cni starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        doc,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
