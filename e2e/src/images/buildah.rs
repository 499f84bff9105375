//! Builds the repository's Dockerfile as CI does: `buildah bud` offline
//! (`--pull=never --network=none`), with the host's release binaries
//! (`--build-arg BINARIES=prebuilt`) and the locally made Debian base of
//! the `runtime-base` stage's packages (`--build-arg RUNTIME_BASE=...`),
//! so the `runtime` stage that users build runs unchanged. The stages it
//! replaces are the ones that need the network: the Rust build (a
//! `rust:` image and crates.io) and the `apt-get install` (Debian's
//! mirror; the same package list is installed by [`super::debian_base`]).
//!
//! buildah runs in a private mount namespace whose `/etc`, `/var/lib` and
//! `/run` are overlays over the real ones: it writes
//! `/etc/cni/net.d/cni.lock` and `/var/lib/containers/cache` whatever its
//! flags say, and those writes land in the overlays and vanish with the
//! namespace. Its storage (`--root`, `--runroot`, `vfs`) and temporary
//! files live in a directory removed afterwards. `--network=none` keeps
//! any `RUN` from setting up networking.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::canal::{BINARIES, release_binaries, workspace_root};
use super::dockerfile::{self, PREBUILT_STAGE, RUNTIME_STAGE};
use super::{BaseSpec, Error, ImageConfig, ImageSpec, Tag, build_image, debian_base, run};

/// What [`dockerfile_build`] builds.
#[derive(Debug, Clone)]
pub struct DockerfileBuild {
    /// The build context: a checkout with `Dockerfile`, `.dockerignore` and
    /// `target/release/` (default: this workspace).
    pub context: PathBuf,
    /// The OCI archive to write (uncompressed layers).
    pub out: PathBuf,
    /// Run `cargo build --release` first.
    pub build: bool,
}

impl Default for DockerfileBuild {
    fn default() -> Self {
        let context = workspace_root();
        DockerfileBuild {
            out: context.join("target/images/dockerfile.oci.tar"),
            context,
            build: true,
        }
    }
}

/// The name the built image has inside buildah (and in the archive's
/// `org.opencontainers.image.ref.name`).
pub const DOCKERFILE_TAG: &str = "localhost/canal:dockerfile";

/// Builds the Dockerfile's `runtime` target and writes it to `opts.out`,
/// returning that path. About 15 s on a warm base.
pub fn dockerfile_build(opts: &DockerfileBuild) -> Result<PathBuf, Error> {
    for tool in ["buildah", "runc"] {
        if !Path::new("/usr/bin").join(tool).is_file()
            && !Path::new("/usr/sbin").join(tool).is_file()
        {
            return Err(Error::MissingTool {
                tool: tool.into(),
                hint: "apt-get install buildah runc (listed in .ci/run)".into(),
            });
        }
    }
    let dockerfile = opts.context.join("Dockerfile");
    let df = dockerfile::load(&dockerfile)?;
    if opts.build {
        release_binaries(true)?;
    }
    // The prebuilt stage copies target/release/ of the context.
    for b in BINARIES {
        let p = opts.context.join("target/release").join(b);
        if !p.is_file() {
            return Err(Error::Invalid(format!(
                "{} is missing (the {PREBUILT_STAGE} stage copies it; is CARGO_TARGET_DIR elsewhere?)",
                p.display()
            )));
        }
    }
    let spec = BaseSpec::new(&df.suite, &df.packages);
    let base = debian_base(&spec)?;
    let out_dir = opts
        .out
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no directory", opts.out.display())))?;
    let base_ref = format!("localhost/canal-runtime-base:{}", spec.key());
    let base_archive = build_image(&ImageSpec {
        tag: Tag::Reference(base_ref.clone()),
        layers: vec![base.layer()],
        config: ImageConfig::default(),
        out_dir: out_dir.to_path_buf(),
    })?;
    let work = tempfile::Builder::new()
        .prefix(".buildah-")
        .tempdir_in(out_dir)
        .map_err(|e| Error::io(format!("creating a directory in {}", out_dir.display()), e))?;
    let tmp_out = work.path().join("image.tar");
    run(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "bash",
            "-c",
            SCRIPT,
            "buildah",
        ])
        .arg(work.path())
        .arg(&base_archive.path)
        .arg(&base_ref)
        .arg(&opts.context)
        .arg(&dockerfile)
        .arg(&tmp_out)
        .arg(DOCKERFILE_TAG)
        .arg(RUNTIME_STAGE))?;
    std::fs::rename(&tmp_out, &opts.out)
        .map_err(|e| Error::io(format!("moving the image to {}", opts.out.display()), e))?;
    Ok(opts.out.clone())
}

const SCRIPT: &str = r#"
set -euo pipefail
work=$1 base_archive=$2 base_ref=$3 context=$4 dockerfile=$5 out=$6 tag=$7 target=$8
for d in etc var/lib run; do
  mkdir -p "$work/overlay/$d/upper" "$work/overlay/$d/work"
  mount -t overlay overlay \
    -o "lowerdir=/$d,upperdir=$work/overlay/$d/upper,workdir=$work/overlay/$d/work" "/$d"
done
mkdir -p "$work/tmp" "$work/cni"
export TMPDIR=$work/tmp
b() { buildah --root "$work/root" --runroot "$work/runroot" --storage-driver vfs "$@"; }
id=$(b pull -q "oci-archive:$base_archive")
b tag "$id" "$base_ref"
b bud --pull=never --network=none --isolation=oci --runtime=/usr/sbin/runc \
  --cni-config-dir="$work/cni" \
  --build-arg BINARIES=prebuilt --build-arg "RUNTIME_BASE=$base_ref" \
  --target "$target" -f "$dockerfile" -t "$tag" "$context"
b push -q --disable-compression "$tag" "oci-archive:$out:$tag"
"#;
