//! `canal-lab e2e [GINKGO-ARGS...]`: the upstream Kubernetes e2e suite
//! (`e2e.test` built from the same module as the cluster) against the
//! lab's real-kubelet cluster, run inside the control-plane namespace, with
//! its test images pointed at the images the lab imported
//! (`--kube-test-repo-list`: no registry is reachable).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::Error;
use crate::lab::netns;
use crate::lab::state::StateDir;
use crate::realnode::images::E2E_REGISTRY;
use crate::realnode::{RealPaths, bins};

/// The repo list: every e2e-test-images registry name mapped to the lab's
/// local name, the rest to names nothing answers for (a test that needs an
/// image the lab does not have fails on the pull, visibly).
pub fn repo_list() -> String {
    format!(
        "promoterE2eRegistry: {E2E_REGISTRY}\n\
         buildImageRegistry: canal.local/build-image\n\
         gcRegistry: registry.k8s.io\n\
         gcEtcdRegistry: registry.k8s.io\n\
         sigStorageRegistry: canal.local/sig-storage\n\
         privateRegistry: canal.local/private\n\
         dockerLibraryRegistry: canal.local/library\n\
         cloudProviderGcpRegistry: canal.local/cloud-provider-gcp\n\
         invalidRegistry: invalid.registry.k8s.io/invalid\n"
    )
}

/// The e2e.test command line for the lab in `state` with `ginkgo_args`.
pub fn command(state: &StateDir, ginkgo_args: &[String]) -> Result<(Command, PathBuf), Error> {
    let paths = RealPaths::new(state);
    let report_dir = paths.dir.join("e2e-report");
    std::fs::create_dir_all(&report_dir)
        .map_err(|e| Error::Io(format!("creating {}", report_dir.display()), e))?;
    let list = paths.dir.join("e2e-repo-list.yaml");
    std::fs::write(&list, repo_list())
        .map_err(|e| Error::Io(format!("writing {}", list.display()), e))?;
    let e2e = paths.bin().join("e2e.test");
    let mut cmd = netns::exec(&state.names().underlay_netns(), &e2e);
    cmd.arg(format!(
        "--kubeconfig={}",
        paths.inner_kubeconfig().display()
    ))
    .arg("--provider=local")
    .arg(format!(
        "--kubectl-path={}",
        paths.bin().join("kubectl").display()
    ))
    .arg(format!("--kube-test-repo-list={}", list.display()))
    .arg(format!("--report-dir={}", report_dir.display()))
    .arg("--ginkgo.no-color")
    .args(ginkgo_args)
    .env("KUBE_TEST_REPO_LIST", &list)
    .current_dir(&paths.dir);
    Ok((cmd, report_dir))
}

/// Builds e2e.test and agnhost when missing and links them into the lab.
pub fn ensure_binaries(state: &StateDir) -> Result<(), Error> {
    bins::ensure(true)?;
    let bin = RealPaths::new(state).bin();
    for name in bins::E2E_COMPONENTS {
        bins::link(&bins::source(name)?, &bin.join(name))?;
    }
    Ok(())
}

/// Runs the suite with its output on this process's stdout and stderr.
pub fn run(state: &StateDir, ginkgo_args: &[String]) -> Result<ExitStatus, Error> {
    ensure_binaries(state)?;
    let (mut cmd, _) = command(state, ginkgo_args)?;
    cmd.status()
        .map_err(|e| Error::Io(format!("running {}", Path::new("e2e.test").display()), e))
}
