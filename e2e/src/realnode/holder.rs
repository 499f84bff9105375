//! The namespace holder of a real node (the hidden `canal-lab
//! __node-holder`): started in the node's network namespace and a new
//! private mount namespace, it sets up the node's view of the file system
//! ([`super::fsview`]), says so with a ready file, and then only sleeps, so
//! the mount namespace outlives restarts of kubelet and containerd (they are
//! started into it, see [`super::enter`]). Killing it, and everything else
//! in the node's cgroup, frees the namespace and every mount in it.

use std::path::Path;
use std::time::Duration;

use crate::Error;
use crate::lab::state::{read_json, write_atomic};
use crate::realnode::fsview::{self, MountOp};

/// Applies the mount plan in `plan`, creates `ready`, and sleeps until killed.
pub fn run(plan: &Path, ready: &Path) -> Result<(), Error> {
    let ops: Vec<MountOp> = read_json(plan)?;
    fsview::apply(&ops)?;
    write_atomic(ready, format!("{}\n", std::process::id()).as_bytes())?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
