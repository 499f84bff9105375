# Helpers shared by scripts/lab, scripts/test, scripts/install-deps and
# .ci/run (sourced, not run). Progress goes to stderr as
#   ==> [+1m05s] what is happening now
# timed from the first script of a run (CANAL_T0 is passed down).

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prog=${prog:-$(basename "$0")}
export CANAL_T0=${CANAL_T0:-$(date +%s)}
target_dir=${CARGO_TARGET_DIR:-$repo/target}

mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
elapsed() { mmss $(($(date +%s) - CANAL_T0)); }
step() { printf '==> [+%s] %s\n' "$(elapsed)" "$*" >&2; }
# die MESSAGE: one line that says what is wrong and how to fix it.
die() { printf '%s: %s\n' "$prog" "$*" >&2; exit 1; }

require_root() {
  [[ $(id -u) -eq 0 ]] ||
    die "must run as root (it installs Debian packages and creates network namespaces): sudo env PATH=\"\$PATH\" $0 $*"
}

require_cargo() {
  command -v cargo >/dev/null ||
    die "cargo is not on PATH: install Rust with https://rustup.rs (as root, or keep your PATH: sudo env PATH=\"\$PATH\" $0)"
}

# The package names of scripts/packages.
package_list() { sed -e 's/#.*//' "$repo/scripts/packages" | awk 'NF { print $1 }'; }

# Installs the packages of scripts/packages that are missing (apt-get).
install_deps() {
  local missing=() p start
  for p in $(package_list); do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    step "Debian packages: all $(package_list | wc -l) of scripts/packages installed"
    return
  fi
  command -v apt-get >/dev/null ||
    die "no apt-get (not Debian?): install these packages yourself: ${missing[*]}"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  step "installing ${#missing[@]} Debian package(s) with apt-get: ${missing[*]}"
  start=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  step "installed in $(mmss $(($(date +%s) - start)))"
}

# Seconds a cold `cargo build --workspace --bins` (empty target directory,
# crates already downloaded) took on the 2-core reference machine while other
# builds kept its load around 15 (4.2 CPU-minutes; README, first-run budget).
cargo_cold_seconds=859

# Builds canal's binaries (cargo); says how long a first build takes.
build_canal() {
  require_cargo
  local note=""
  [[ -x $target_dir/debug/canal-lab ]] ||
    note=" (a first build took $(mmss $cargo_cold_seconds) on 2 busy cores, less on an idle machine)"
  step "building canal: cargo build --workspace --bins$note"
  (cd "$repo" && cargo build --workspace --bins --locked)
}

# Everything the lab and the tests need, in the order that fails soonest:
# root and Go up front, packages, canal's build, canal-lab's own preflight
# (kernel, tools), then the long Go build of the test control plane.
prepare() {
  require_root "$@"
  require_cargo
  bash "$repo/e2e/go/build.sh" --check || exit 1
  install_deps
  build_canal
  step "preflight: canal-lab preflight"
  "$target_dir/debug/canal-lab" preflight || exit 1
  step "test control plane (kube-apiserver, etcd, kubectl, helm from Go modules, cached per version): e2e/go/build.sh"
  bash "$repo/e2e/go/build.sh"
}
