//! A real Kubernetes control plane on loopback: etcd and kube-apiserver with
//! generated certificates and RBAC on. Tests own one each (killed on drop,
//! also when the test panics or the test process dies); the lab starts one
//! detached and stops it with `canal-lab down`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::binaries::Binaries;
use crate::certs::{self, Pki};
use crate::process::{self, OwnedChild};
use crate::{Error, ports};

/// The Service CIDR the API server is told about (unused by canal itself).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Where one control plane keeps its files.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The root directory.
    pub dir: PathBuf,
}

impl Layout {
    /// etcd's data directory.
    pub fn etcd_data(&self) -> PathBuf {
        self.dir.join("etcd-data")
    }
    /// Certificates and keys.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }
    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// A log file.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }
    /// A pid file of a detached process.
    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }
}

/// Ports and commands of one control plane, before anything runs.
struct Plan {
    layout: Layout,
    etcd: Command,
    apiserver: Command,
    etcd_port: u16,
    server: String,
}

fn plan(bins: &Binaries, dir: &Path) -> Result<(Plan, Pki), Error> {
    let layout = Layout {
        dir: dir.to_path_buf(),
    };
    std::fs::create_dir_all(&layout.dir)
        .map_err(|e| Error::Io(format!("creating {}", dir.display()), e))?;
    let _ = std::fs::remove_dir_all(layout.etcd_data());
    let pki = certs::generate(&layout.pki_dir())?;
    let (etcd_port, peer_port, api_port) = (
        ports::free_loopback_port()?,
        ports::free_loopback_port()?,
        ports::free_loopback_port()?,
    );

    let mut etcd = Command::new(&bins.etcd);
    etcd.arg("--name=canal")
        .arg(format!("--data-dir={}", layout.etcd_data().display()))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
        .arg(format!(
            "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
        ))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
        ))
        .arg(format!(
            "--initial-cluster=canal=http://127.0.0.1:{peer_port}"
        ))
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn")
        .arg("--quota-backend-bytes=8589934592");

    let mut apiserver = Command::new(&bins.kube_apiserver);
    apiserver
        .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={api_port}"))
        .arg(format!("--cert-dir={}", layout.pki_dir().display()))
        .arg(format!("--tls-cert-file={}", pki.server_cert.display()))
        .arg(format!(
            "--tls-private-key-file={}",
            pki.server_key.display()
        ))
        .arg(format!("--client-ca-file={}", pki.ca_cert.display()))
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!(
            "--service-account-key-file={}",
            pki.sa_pub.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            pki.sa_key.display()
        ))
        .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
        .arg("--authorization-mode=Node,RBAC")
        // No kube-controller-manager runs, so nothing would create the
        // ServiceAccount admission needs; pods in tests carry no token.
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--enable-priority-and-fairness=false")
        // Loopback is not a valid advertise address for the kubernetes
        // Service endpoints, and nothing here needs them.
        .arg("--endpoint-reconciler-type=none")
        .arg("--profiling=false")
        .arg("--v=1");

    let server = format!("https://127.0.0.1:{api_port}");
    write_kubeconfig(
        &layout.kubeconfig(),
        &server,
        &pki.ca_cert,
        &pki.admin_cert,
        &pki.admin_key,
    )?;
    Ok((
        Plan {
            layout,
            etcd,
            apiserver,
            etcd_port,
            server,
        },
        pki,
    ))
}

/// Writes a kubeconfig that reaches `server` with a client certificate.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(), Error> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: canal-lab\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: canal-admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: canal-lab\n  context:\n    cluster: canal-lab\n    user: canal-admin\ncurrent-context: canal-lab\n",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    std::fs::write(path, text).map_err(|e| Error::Io(format!("writing {}", path.display()), e))
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, Error> {
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|e| Error::Kubeconfig(path.to_path_buf(), e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(path.to_path_buf(), e.to_string()))?;
    Client::try_from(config).map_err(|e| Error::Kubeconfig(path.to_path_buf(), e.to_string()))
}

async fn wait_tcp(
    port: u16,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        alive()?;
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("etcd on port {port}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/readyz` answers ok (every post-start hook done, RBAC
/// bootstrap roles included) and returns a client.
async fn wait_ready(
    kubeconfig: &Path,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<(), Error>,
) -> Result<Client, Error> {
    let client = client_from_kubeconfig(kubeconfig).await?;
    let mut last: String;
    loop {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::Timeout(e.to_string()))?;
        match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(client),
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        alive()?;
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("kube-apiserver /readyz: {last}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A control plane owned by the caller (a test). Everything stops on drop.
pub struct ControlPlane {
    /// Files of this control plane.
    pub layout: Layout,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// The certificates.
    pub pki: Pki,
    client: Client,
    apiserver: OwnedChild,
    etcd: OwnedChild,
    _tempdir: Option<tempfile::TempDir>,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver in a fresh temporary directory.
    pub async fn start() -> Result<ControlPlane, Error> {
        let tmp = tempfile::Builder::new()
            .prefix("canal-cp-")
            .tempdir()
            .map_err(|e| Error::Io("creating a temporary directory".into(), e))?;
        let dir = tmp.path().to_path_buf();
        let mut cp = ControlPlane::start_in(&dir).await?;
        cp._tempdir = Some(tmp);
        Ok(cp)
    }

    /// Starts etcd and kube-apiserver with their files in `dir`. Retries
    /// twice when a port was taken by someone else in the meantime.
    pub async fn start_in(dir: &Path) -> Result<ControlPlane, Error> {
        let bins = Binaries::ensure()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match ControlPlane::try_start(&bins, dir).await {
                Ok(cp) => return Ok(cp),
                Err(e) if attempt < 3 && e.is_startup_failure() => {
                    tracing::warn!(
                        "control plane failed to start (attempt {attempt}), retrying: {e}"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_start(bins: &Binaries, dir: &Path) -> Result<ControlPlane, Error> {
        let (plan, pki) = plan(bins, dir)?;
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut etcd = OwnedChild::spawn("etcd", plan.etcd, &plan.layout.log("etcd"))?;
        wait_tcp(plan.etcd_port, deadline, || etcd.check_running()).await?;
        let mut apiserver = OwnedChild::spawn(
            "kube-apiserver",
            plan.apiserver,
            &plan.layout.log("kube-apiserver"),
        )?;
        let client = wait_ready(&plan.layout.kubeconfig(), deadline, || {
            apiserver.check_running()?;
            etcd.check_running()
        })
        .await?;
        Ok(ControlPlane {
            layout: plan.layout,
            server: plan.server,
            pki,
            client,
            apiserver,
            etcd,
            _tempdir: None,
        })
    }

    /// An admin client (group system:masters).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig path.
    pub fn kubeconfig(&self) -> PathBuf {
        self.layout.kubeconfig()
    }

    /// `kubectl --kubeconfig <admin>` of the matching release.
    pub fn kubectl(&self) -> Result<Command, Error> {
        let bins = Binaries::ensure()?;
        let mut cmd = Command::new(bins.kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig().display()));
        Ok(cmd)
    }

    /// Stops the API server and etcd now (drop does the same).
    pub fn stop(&mut self) {
        self.apiserver.stop(Duration::from_secs(5));
        self.etcd.stop(Duration::from_secs(5));
    }

    /// Last lines of the API server log, for failure messages.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        self.apiserver.log_tail(lines)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A control plane started for the lab: detached processes with pid files.
#[derive(Debug, Clone)]
pub struct DetachedControlPlane {
    /// Files of this control plane.
    pub layout: Layout,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
}

/// The processes a detached control plane runs, in stop order.
const DETACHED: [(&str, &str); 2] = [("kube-apiserver", "kube-apiserver"), ("etcd", "etcd")];

/// Starts etcd and kube-apiserver detached from the caller, waits until the
/// API server is ready, and returns a client. A start that fails (a port
/// taken in the meantime, a process that died) is stopped and retried twice.
pub async fn start_detached(dir: &Path) -> Result<(DetachedControlPlane, Client), Error> {
    let bins = Binaries::ensure()?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_start_detached(&bins, dir).await {
            Ok(started) => return Ok(started),
            Err(e) if attempt < 3 && e.is_startup_failure() => {
                stop_detached(dir);
                eprintln!("control plane failed to start (attempt {attempt}), retrying: {e}");
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_start_detached(
    bins: &Binaries,
    dir: &Path,
) -> Result<(DetachedControlPlane, Client), Error> {
    let (plan, _pki) = plan(bins, dir)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let layout = plan.layout.clone();
    let alive = |name: &str, expect: &str| {
        let layout = layout.clone();
        let (name, expect) = (name.to_string(), expect.to_string());
        move || match process::live_pid(&layout.pid_file(&name), &expect) {
            Some(_) => Ok(()),
            None => Err(Error::Exited {
                name: name.clone(),
                status: "exited".into(),
                log_tail: process::tail(&layout.log(&name), 30),
            }),
        }
    };
    process::spawn_detached(
        "etcd",
        plan.etcd,
        &layout.log("etcd"),
        &layout.pid_file("etcd"),
    )?;
    wait_tcp(plan.etcd_port, deadline, alive("etcd", "etcd")).await?;
    process::spawn_detached(
        "kube-apiserver",
        plan.apiserver,
        &layout.log("kube-apiserver"),
        &layout.pid_file("kube-apiserver"),
    )?;
    let client = wait_ready(
        &layout.kubeconfig(),
        deadline,
        alive("kube-apiserver", "kube-apiserver"),
    )
    .await?;
    Ok((
        DetachedControlPlane {
            layout,
            server: plan.server,
        },
        client,
    ))
}

/// Stops a detached control plane; returns the names of processes it stopped.
pub fn stop_detached(dir: &Path) -> Vec<String> {
    let layout = Layout {
        dir: dir.to_path_buf(),
    };
    DETACHED
        .iter()
        .filter(|(name, expect)| {
            process::stop_pid_file(&layout.pid_file(name), expect, Duration::from_secs(5))
        })
        .map(|(name, _)| name.to_string())
        .collect()
}
