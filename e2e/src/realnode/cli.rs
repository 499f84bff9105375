//! The `canal-lab` commands of the real-kubelet lab: `up --kubelet`,
//! `status` and `e2e`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::Error;
use crate::lab::state::{StateDir, write_json};
use crate::realnode::up::{self, RealUpOptions};
use crate::realnode::{RealPaths, canal, control, images, node, suite};

/// `canal-lab up --kubelet`.
pub async fn up(
    state: &StateDir,
    nodes: u32,
    install_canal: bool,
    timeout: u64,
    started: Instant,
) -> Result<ExitCode, Error> {
    let opts = RealUpOptions {
        nodes,
        install_canal,
        ready_timeout: Duration::from_secs(timeout.max(300)),
        ..RealUpOptions::default()
    };
    let (ctx, record) = up::up(state, &opts).await?;
    println!(
        "real-kubelet lab up in {:.1}s: {nodes} node(s) with kubelet, containerd and kube-proxy; API server {} (https://{}:6443 inside the lab){}\nkubeconfig: {}\ntry: canal-lab --state-dir {} kubectl -- get pods -A -o wide",
        started.elapsed().as_secs_f64(),
        ctx.lab.server,
        record.control_plane,
        if install_canal {
            format!("; canal installed by helm ({})", record.canal_image)
        } else {
            "; canal not installed (nodes NotReady)".into()
        },
        state.kubeconfig().display(),
        state.dir.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// `canal-lab status` of a real-kubelet lab.
pub async fn status(state: &StateDir) -> Result<ExitCode, Error> {
    let (ctx, record) = up::open(state).await?;
    let paths = RealPaths::new(state);
    let mut healthy = true;
    let mut line = |ok: bool, text: String| {
        healthy &= ok;
        println!("{} {text}", if ok { " ok " } else { "FAIL" });
    };
    match control::check(&paths) {
        Ok(()) => line(
            true,
            format!(
                "control plane (etcd, kube-apiserver {} / https://{}:6443, kube-controller-manager, kube-scheduler)",
                ctx.lab.server, record.control_plane
            ),
        ),
        Err(e) => line(false, format!("control plane: {e}")),
    }
    let nctx = up::node_context(state, &record)?;
    for n in state.nodes()? {
        for (p, _) in node::PROCESSES {
            match nctx.check(&n, p) {
                Ok(()) => line(true, format!("{}: {p}", n.name)),
                Err(e) => line(false, format!("{}: {e}", n.name)),
            }
        }
    }
    if !record.release.is_empty() {
        let problems = canal::not_ready(&ctx.client, state.nodes()?.len()).await?;
        line(
            problems.is_empty(),
            if problems.is_empty() {
                format!(
                    "every node Ready, every canal pod Ready ({})",
                    record.canal_image
                )
            } else {
                format!("not ready: {}", problems.join("; "))
            },
        );
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Makes sure agnhost is in every node's containerd (a lab brought up
/// before e2e.test and agnhost were built lacks it).
pub fn ensure_agnhost(state: &StateDir) -> Result<(), Error> {
    let mut record = up::load(state)?;
    let agnhost = images::agnhost()?;
    if record.images.contains(&agnhost.reference) {
        return Ok(());
    }
    let nctx = up::node_context(state, &record)?;
    for n in state.nodes()? {
        nctx.import(&n, std::slice::from_ref(&agnhost))?;
    }
    record.images.push(agnhost.reference);
    write_json(&RealPaths::new(state).record(), &record)
}

/// `canal-lab e2e [GINKGO-ARGS...]`.
pub async fn e2e(state: &StateDir, args: &[String]) -> Result<ExitCode, Error> {
    up::load(state)?;
    suite::ensure_binaries(state)?;
    ensure_agnhost(state)?;
    let started = Instant::now();
    let status = suite::run(state, args)?;
    eprintln!(
        "canal-lab e2e: e2e.test {} after {:.0}s (report in {})",
        status,
        started.elapsed().as_secs_f64(),
        RealPaths::new(state).dir.join("e2e-report").display()
    );
    Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
}
