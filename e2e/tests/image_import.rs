//! The canal image imported into a real containerd, as every lab node
//! imports it: `ctr -n k8s.io images import` (with `--local` on containerd
//! 2.x), listed under its reference and digest, unpacked by containerd's
//! own snapshotter and differ, and its programs run from the rootfs
//! containerd mounted.
//!
//! The containerd is a throwaway one: its own root, state and socket under
//! a temporary directory, its CRI, NRI and /opt plugins disabled, inside a
//! private mount namespace whose /etc, /var/lib, /run and /opt are
//! overlays, so nothing it writes outside its directories survives it. Its
//! binaries: `$CANAL_CONTAINERD_BIN_DIR`, else the lab's cached Debian
//! containerd (`<cache>/containerd-<version>/usr/bin`, as e2e/go/build.sh
//! unpacks it), else Debian's package unpacked here the same way (never
//! installed: installing would start a service).

mod image_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use canal_e2e::binaries::cache_base;
use canal_e2e::images::{self, CanalImageOptions};

const BINARIES: [&str; 2] = ["containerd", "ctr"];

fn containerd_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CANAL_CONTAINERD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let has = |d: &Path| BINARIES.iter().all(|b| d.join(b).is_file());
    let mut cached: Vec<PathBuf> = std::fs::read_dir(cache_base())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("containerd-"))
        })
        .map(|p| p.join("usr/bin"))
        .filter(|d| has(d))
        .collect();
    cached.sort();
    if let Some(dir) = cached.pop() {
        return dir;
    }
    // Unpack Debian's package as build.sh does (same directory and lock).
    let policy = Command::new("apt-cache")
        .args(["policy", "containerd"])
        .output()
        .unwrap();
    let policy = String::from_utf8_lossy(&policy.stdout);
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .expect("apt knows no containerd package (apt-get update first)")
        .to_string();
    let out = cache_base().join(format!(
        "containerd-{}",
        version.replace([':', '~', '+'], "_")
    ));
    std::fs::create_dir_all(&out).unwrap();
    let script = r#"set -euo pipefail
out=$1 ver=$2
exec 8>"$out/.build.lock"; flock 8
if [[ ! -x $out/usr/bin/ctr ]]; then
  tmp=$(mktemp -d "$out/.tmp.XXXXXX")
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "containerd=$ver" && dpkg-deb -x ./containerd_*.deb "$tmp/root")
  cp -a "$tmp/root/." "$out/"
  rm -rf "$tmp"
fi"#;
    let status = Command::new("bash")
        .args(["-c", script, "fetch"])
        .arg(&out)
        .arg(&version)
        .status()
        .unwrap();
    assert!(status.success(), "unpacking Debian's containerd {version}");
    out.join("usr/bin")
}

const SCRIPT: &str = r#"
set -euo pipefail
bin=$1 work=$2 archive=$3 ref=$4
for d in etc var/lib run opt; do
  [[ -d /$d ]] || continue
  mkdir -p "$work/overlay/$d/upper" "$work/overlay/$d/work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$work/overlay/$d/upper,workdir=$work/overlay/$d/work" "/$d"
done
cat > "$work/config.toml" <<EOF
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
[debug]
  address = "$work/debug.sock"
EOF
"$bin/containerd" --config "$work/config.toml" > "$work/containerd.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 200); do [[ -S $work/containerd.sock ]] && break; sleep 0.05; done
[[ -S $work/containerd.sock ]] || { cat "$work/containerd.log"; exit 1; }
c() { "$bin/ctr" --address "$work/containerd.sock" -n k8s.io "$@"; }
local=()
if c images import --help | grep -q -- '--local'; then local=(--local); fi
start=$(date +%s%N)
c images import "${local[@]}" "$archive"
echo "import-ms: $(( ($(date +%s%N) - start) / 1000000 ))"
c images ls
mkdir -p "$work/mnt" "$work/rootfs"
c images mount "$ref" "$work/mnt" >/dev/null
cp -a "$work/mnt/." "$work/rootfs/"
c images unmount "$work/mnt" >/dev/null
"#;

#[test]
fn containerd_imports_unpacks_and_finds_the_canal_image() {
    let canal = images::canal_image(&CanalImageOptions::default()).unwrap();
    let bin = containerd_bin_dir();
    let work = tempfile::Builder::new()
        .prefix(".import-")
        .tempdir_in(canal.path.parent().unwrap())
        .unwrap();
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "bash",
            "-c",
            SCRIPT,
            "import",
        ])
        .arg(&bin)
        .arg(work.path())
        .arg(&canal.path)
        .arg(&canal.reference)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "import failed ({}):\n{stdout}\n{}\ncontainerd log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(work.path().join("containerd.log")).unwrap_or_default()
    );
    // `ctr images ls`: REF TYPE DIGEST SIZE PLATFORMS LABELS.
    let listed: Vec<Vec<&str>> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("REF"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        listed
            .iter()
            .any(|cols| cols.first() == Some(&canal.reference.as_str())
                && cols.get(2) == Some(&canal.digest.as_str())),
        "{} {} not listed:\n{stdout}",
        canal.reference,
        canal.digest
    );
    assert_eq!(listed.len(), 1, "one image expected:\n{stdout}");
    let ms = stdout
        .lines()
        .find_map(|l| l.strip_prefix("import-ms: "))
        .unwrap_or("?");
    eprintln!(
        "containerd ({}) imported {} ({} MB) in {ms} ms",
        bin.display(),
        canal.reference,
        canal.size / 1_000_000
    );
    // The rootfs containerd unpacked runs like the one we unpack ourselves.
    let user = images::read_archive(&canal.path).unwrap().images[0]
        .config
        .user
        .clone();
    image_common::check_canal_rootfs(&work.path().join("rootfs"), user.as_deref());
}
