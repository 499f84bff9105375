//! helm, built from Go modules by `e2e/go/build.sh`, for the chart tests.

use std::path::PathBuf;
use std::process::Command;

use crate::Error;
use crate::binaries::{build_script, cache_base};

/// The helm release the chart tests use (must match `e2e/go/helm/go.mod`).
pub const HELM_VERSION: &str = "v3.22.0";

/// Path of the cached helm binary, building it first when missing.
pub fn helm() -> Result<PathBuf, Error> {
    let dir = cache_base().join(format!("helm-{HELM_VERSION}"));
    let path = dir.join("helm");
    if path.is_file() {
        return Ok(path);
    }
    let status = Command::new("bash")
        .arg(build_script())
        .status()
        .map_err(|e| Error::Io(format!("running {}", build_script().display()), e))?;
    if status.success() && path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinaries {
            dir,
            hint: format!("{} failed ({status})", build_script().display()),
        })
    }
}
