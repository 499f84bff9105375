//! The canal image: the Dockerfile's runtime stage rebuilt without a
//! container engine, from the workspace's release binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::dockerfile::{self, CanalDockerfile};
use super::{
    BaseSpec, Entry, Error, ImageArchive, ImageConfig, ImageSpec, Layer, Tag, build_image,
    debian_base,
};

/// The repository of the canal image (the chart's `image.repository`
/// default).
pub const CANAL_REPOSITORY: &str = "ghcr.io/canal-dev/canal";

/// The binaries the image carries, all in the Dockerfile's binary
/// directory (kubectl-canal: the kubectl plugin).
pub const BINARIES: [&str; 4] = [
    "canal-controller",
    "canal-agent",
    "canal-cni",
    "kubectl-canal",
];

/// What cargo sets for the crate it runs or tests (besides `CARGO_PKG_*`
/// and `CARGO_BIN_EXE_*`), none of which a build should see.
const CARGO_RUN_VARS: [&str; 7] = [
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// How to build [`canal_image`].
#[derive(Debug, Clone)]
pub struct CanalImageOptions {
    /// Where the archive goes; default `<target dir>/images`.
    pub out_dir: Option<PathBuf>,
    /// Run `cargo build --release` first (cargo rebuilds only what is
    /// stale); `false` uses whatever `target/release` holds, and fails when
    /// a binary is missing.
    pub build: bool,
}

impl Default for CanalImageOptions {
    fn default() -> Self {
        CanalImageOptions {
            out_dir: None,
            build: true,
        }
    }
}

/// The root of the workspace these tools were built from.
pub fn workspace_root() -> PathBuf {
    // e2e/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")))
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `target/release/<binary>` for each of [`BINARIES`], built first when
/// `build` (`cargo build --release --locked --bins -p canal-controller -p
/// canal-agent`, as the Dockerfile's build stage does).
pub fn release_binaries(build: bool) -> Result<Vec<PathBuf>, Error> {
    let release = target_dir().join("release");
    if build {
        // Inside `cargo test`/`cargo run`, $CARGO is the cargo running us.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let started = std::time::Instant::now();
        let args = [
            "build",
            "--release",
            "--locked",
            "--bins",
            "-p",
            "canal-controller",
            "-p",
            "canal-agent",
            "-p",
            "kubectl-canal",
        ];
        // cargo's progress goes to our stderr: a cold build takes minutes.
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(workspace_root()).args(args);
        // Under `cargo test`/`cargo run` we inherit the variables cargo sets
        // for the crate it runs. Some build scripts track them (ring reruns
        // on CARGO_MANIFEST_DIR), so passing them on would make a build
        // from a test and one from a shell invalidate each other: a full
        // release rebuild each time.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if CARGO_RUN_VARS.contains(&key.as_ref())
                || key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
            {
                cmd.env_remove(key.as_ref());
            }
        }
        let status = cmd
            .stdin(std::process::Stdio::null())
            .status()
            .map_err(|e| Error::io(format!("running {}", cargo.to_string_lossy()), e))?;
        if !status.success() {
            return Err(Error::Command {
                command: format!("cargo {}", args.join(" ")),
                detail: format!("{status} (its output is above)"),
            });
        }
        let secs = started.elapsed().as_secs();
        if secs > 5 {
            eprintln!("canal: release binaries built in {secs}s");
        }
    }
    BINARIES
        .iter()
        .map(|b| {
            let p = release.join(b);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::Invalid(format!(
                    "{} is missing: run cargo build --release --bins -p canal-controller -p canal-agent -p kubectl-canal",
                    p.display()
                )))
            }
        })
        .collect()
}

/// The canal image, as the Dockerfile's `runtime` stage describes it: a
/// Debian base of the `runtime-base` stage's suite and packages, the three
/// release binaries in its binary directory (mode 0755, root), its `USER`
/// and `ENTRYPOINT`. Named `ghcr.io/canal-dev/canal:<version>-dev.<12 hex
/// of the manifest digest>`.
pub fn canal_image(opts: &CanalImageOptions) -> Result<ImageArchive, Error> {
    let df = dockerfile::load(&workspace_root().join("Dockerfile"))?;
    let base = debian_base(&BaseSpec::new(&df.suite, &df.packages))?;
    let binaries = release_binaries(opts.build)?;
    build_image(&ImageSpec {
        tag: Tag::Content {
            repository: CANAL_REPOSITORY.to_string(),
            prefix: format!("{}-dev.", env!("CARGO_PKG_VERSION")),
        },
        layers: vec![base.layer(), binaries_layer(&df, &binaries)?],
        config: canal_config(&df),
        out_dir: opts
            .out_dir
            .clone()
            .unwrap_or_else(|| target_dir().join("images")),
    })
}

fn binaries_layer(df: &CanalDockerfile, binaries: &[PathBuf]) -> Result<Layer, Error> {
    let dir = df.binaries_dir.trim_end_matches('/');
    let entries = binaries
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .ok_or_else(|| Error::Invalid(format!("{} has no file name", p.display())))?;
            Ok(Entry::file(
                format!("{dir}/{}", name.to_string_lossy()),
                p,
                0o755,
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Layer::Entries(entries))
}

/// The image configuration the Dockerfile's runtime stage gives (the
/// base's `PATH` is added by the archive writer).
pub(crate) fn canal_config(df: &CanalDockerfile) -> ImageConfig {
    ImageConfig {
        entrypoint: df.entrypoint.clone(),
        user: df.user.clone(),
        ..ImageConfig::default()
    }
}
