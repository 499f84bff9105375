//! The real-kubelet lab's control plane: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler inside the underlay namespace,
//! the API server on the bridge address, and the forwarder that brings it to
//! the root namespace's loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Client;

use crate::Error;
use crate::control_plane::{self, SERVICE_CIDR};
use crate::lab::netns;
use crate::lab::state::StateDir;
use crate::process;
use crate::realnode::pki::{ClusterPki, KeyPairFiles};
use crate::realnode::{API_PORT, RealPaths};

/// etcd's client port inside the control-plane namespace.
const ETCD_PORT: u16 = 2379;
/// etcd's peer port inside the control-plane namespace.
const ETCD_PEER_PORT: u16 = 2380;

/// The control-plane processes, in stop order (pid file stem, program).
pub const PROCESSES: [(&str, &str); 5] = [
    ("kube-scheduler", "kube-scheduler"),
    ("kube-controller-manager", "kube-controller-manager"),
    ("kube-apiserver", "kube-apiserver"),
    ("etcd", "etcd"),
    ("api-forward", "canal-lab"),
];

/// A running control plane.
#[derive(Debug, Clone)]
pub struct Control {
    /// The API server's underlay address.
    pub address: Ipv4Addr,
    /// The forwarder's port on the root namespace's loopback.
    pub api_port: u16,
    /// The certificates.
    pub pki: ClusterPki,
}

fn spawn_in_ns(
    paths: &RealPaths,
    netns_name: &str,
    name: &str,
    args: Vec<String>,
) -> Result<u32, Error> {
    let mut cmd = netns::exec(netns_name, paths.bin().join(name));
    cmd.args(args);
    process::spawn_detached(
        name,
        cmd,
        &paths.control().join(format!("{name}.log")),
        &paths.control().join(format!("{name}.pid")),
    )
}

fn exited(paths: &RealPaths, name: &str) -> Error {
    Error::Exited {
        name: name.to_string(),
        status: "exited".into(),
        log_tail: process::tail(&paths.control().join(format!("{name}.log")), 30),
    }
}

fn check_alive(paths: &RealPaths, name: &str, program: &str) -> Result<(), Error> {
    match process::live_pid(&paths.control().join(format!("{name}.pid")), program) {
        Some(_) => Ok(()),
        None => Err(exited(paths, name)),
    }
}

fn kubeconfig(path: &Path, server: &str, ca: &Path, files: &KeyPairFiles) -> Result<(), Error> {
    control_plane::write_kubeconfig(path, server, ca, &files.cert, &files.key)
}

/// Starts the control plane in the underlay namespace of the lab in `state`
/// and returns it with an admin client (through the forwarder).
pub async fn start(
    state: &StateDir,
    paths: &RealPaths,
    canal_lab: &Path,
    address: Ipv4Addr,
) -> Result<(Control, Client), Error> {
    let ns = state.names().underlay_netns();
    let prefix_len = state.names().underlay().prefix_len();
    netns::ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{address}/{prefix_len}"),
        "dev",
        crate::lab::names::UNDERLAY_BRIDGE,
    ])?;
    let control = paths.control();
    std::fs::create_dir_all(&control)
        .map_err(|e| Error::Io(format!("creating {}", control.display()), e))?;
    let pki = ClusterPki::generate(&paths.pki(), address)?;
    let ca = pki.base.ca_cert.clone();
    let inner = format!("https://127.0.0.1:{API_PORT}");
    let admin = KeyPairFiles {
        cert: pki.base.admin_cert.clone(),
        key: pki.base.admin_key.clone(),
    };
    kubeconfig(&paths.inner_kubeconfig(), &inner, &ca, &admin)?;
    let kcm_kc = control.join("kube-controller-manager.kubeconfig");
    kubeconfig(&kcm_kc, &inner, &ca, &pki.controller_manager)?;
    let sched_kc = control.join("kube-scheduler.kubeconfig");
    kubeconfig(&sched_kc, &inner, &ca, &pki.scheduler)?;

    let deadline = Instant::now() + Duration::from_secs(120);
    let etcd_data = control.join("etcd-data");
    spawn_in_ns(
        paths,
        &ns,
        "etcd",
        vec![
            "--name=canal".into(),
            format!("--data-dir={}", etcd_data.display()),
            format!("--listen-client-urls=http://127.0.0.1:{ETCD_PORT}"),
            format!("--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}"),
            format!("--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
            format!("--initial-cluster=canal=http://127.0.0.1:{ETCD_PEER_PORT}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
            "--quota-backend-bytes=8589934592".into(),
        ],
    )?;
    wait_tcp_in(
        &ns,
        SocketAddr::from((Ipv4Addr::LOCALHOST, ETCD_PORT)),
        deadline,
        || check_alive(paths, "etcd", "etcd"),
    )
    .await?;

    spawn_in_ns(
        paths,
        &ns,
        "kube-apiserver",
        vec![
            format!("--etcd-servers=http://127.0.0.1:{ETCD_PORT}"),
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={address}"),
            format!("--secure-port={API_PORT}"),
            format!("--cert-dir={}", paths.pki().display()),
            format!("--tls-cert-file={}", pki.apiserver.cert.display()),
            format!("--tls-private-key-file={}", pki.apiserver.key.display()),
            format!("--client-ca-file={}", ca.display()),
            format!(
                "--kubelet-client-certificate={}",
                pki.apiserver_kubelet_client.cert.display()
            ),
            format!(
                "--kubelet-client-key={}",
                pki.apiserver_kubelet_client.key.display()
            ),
            // Node names resolve nowhere here; the InternalIP is the underlay address.
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", pki.base.sa_pub.display()),
            format!(
                "--service-account-signing-key-file={}",
                pki.base.sa_key.display()
            ),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            "--allow-privileged=true".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ],
    )?;
    let port_file = control.join("api-port");
    let _ = std::fs::remove_file(&port_file);
    let mut fwd = std::process::Command::new(canal_lab);
    fwd.arg("--state-dir")
        .arg(&state.dir)
        .arg("__api-forward")
        .arg("--netns")
        .arg(&ns)
        .arg("--upstream")
        .arg(SocketAddr::from((address, API_PORT)).to_string())
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--port-file")
        .arg(&port_file);
    process::spawn_detached(
        "API forwarder",
        fwd,
        &control.join("api-forward.log"),
        &control.join("api-forward.pid"),
    )?;
    let api_port = loop {
        if let Some(port) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
        {
            break port;
        }
        check_alive(paths, "api-forward", "canal-lab")?;
        if Instant::now() > deadline {
            return Err(Error::Timeout("the API forwarder to listen".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    kubeconfig(
        &state.kubeconfig(),
        &format!("https://127.0.0.1:{api_port}"),
        &ca,
        &admin,
    )?;
    let client = wait_ready(&state.kubeconfig(), deadline, || {
        check_alive(paths, "kube-apiserver", "kube-apiserver")?;
        check_alive(paths, "etcd", "etcd")
    })
    .await?;

    let common = |kc: &PathBuf| {
        vec![
            format!("--kubeconfig={}", kc.display()),
            format!("--authentication-kubeconfig={}", kc.display()),
            format!("--authorization-kubeconfig={}", kc.display()),
            "--bind-address=127.0.0.1".to_string(),
            "--leader-elect=false".to_string(),
            "--v=1".to_string(),
        ]
    };
    let mut kcm = common(&kcm_kc);
    kcm.extend([
        format!("--root-ca-file={}", ca.display()),
        format!(
            "--service-account-private-key-file={}",
            pki.base.sa_key.display()
        ),
        "--use-service-account-credentials=true".into(),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--cluster-name=canal-lab".into(),
        // canal-controller allocates Node.spec.podCIDR; node IPAM stays off.
        "--allocate-node-cidrs=false".into(),
        "--profiling=false".into(),
    ]);
    spawn_in_ns(paths, &ns, "kube-controller-manager", kcm)?;
    let mut sched = common(&sched_kc);
    sched.push("--profiling=false".into());
    spawn_in_ns(paths, &ns, "kube-scheduler", sched)?;
    Ok((
        Control {
            address,
            api_port,
            pki,
        },
        client,
    ))
}

/// Whether every control-plane process is alive; the first dead one's error.
pub fn check(paths: &RealPaths) -> Result<(), Error> {
    for (name, program) in PROCESSES {
        check_alive(paths, name, program)?;
    }
    Ok(())
}

/// Stops the control plane; returns the names of what it stopped.
pub fn stop(paths: &RealPaths) -> Vec<String> {
    PROCESSES
        .iter()
        .filter(|(name, program)| {
            process::stop_pid_file(
                &paths.control().join(format!("{name}.pid")),
                program,
                Duration::from_secs(5),
            )
        })
        .map(|(name, _)| name.to_string())
        .collect()
}

async fn wait_tcp_in(
    netns_name: &str,
    addr: SocketAddr,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    loop {
        let ns = netns_name.to_string();
        let up = tokio::task::spawn_blocking(move || {
            netns::run_in(&ns, move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        })
        .await
        .map_err(|e| Error::Lab(format!("probing {addr}: {e}")))??;
        if up {
            return Ok(());
        }
        alive()?;
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!("{addr} inside {netns_name}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(
    kubeconfig: &Path,
    deadline: Instant,
    mut alive: impl FnMut() -> Result<(), Error>,
) -> Result<Client, Error> {
    let client = control_plane::client_from_kubeconfig(kubeconfig).await?;
    let mut last: String;
    loop {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::Lab(e.to_string()))?;
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
