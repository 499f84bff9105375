#!/usr/bin/env bash
# Builds the real tools canal's tests and lab run, from Go modules (and one
# Debian package), into a per-version cache outside the repository.
#
#   build.sh [--check] [GROUP...]   GROUP: control-plane (the default), node, e2e, all
#
#   control-plane  <cache>/k8s-<version>/{kube-apiserver,kubectl,etcd}
#                  <cache>/helm-<version>/helm
#                  (the integration tests and the stand-in lab need only these)
#   node           <cache>/k8s-<version>/{kubelet,kube-scheduler,kube-controller-manager,
#                  kube-proxy,pause,agnhost}   (the real-kubelet lab: `canal-lab up --kubelet`;
#                  agnhost is its test workload)
#                  <cache>/containerd-<debian version>/usr/bin/{containerd,ctr,...}
#   e2e            <cache>/k8s-<version>/e2e.test   (`canal-lab e2e`, the upstream suites)
#
# k8s.io/kubernetes is pinned with its staging modules by replace directives
# in go.mod, so every Kubernetes binary comes from one module set; etcd from
# go.etcd.io; helm from helm.sh/helm/v3 (helm/go.mod). <cache> is
# $CANAL_CACHE_DIR, else $XDG_CACHE_HOME/canal, else ~/.cache/canal.
# Each target is checked on its own: only missing binaries are built.
#
# `build.sh --check [GROUP...]` only says whether a build is needed and
# possible: exit 0 when everything is cached or Go is installed, else one line
# naming the fix.
#
# Progress: one line per binary ("[2/4] kubectl ...") with the elapsed time,
# a heartbeat every 30 s while `go build` is silent, and on a cold build the
# time that step took on the 2-core reference machine.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")
helm_version=$(awk '$1 == "require" && $2 == "helm.sh/helm/v3" { print $3; exit }' "$here/helm/go.mod")
go_version=$(awk '$1 == "go" { print $2; exit }' "$here/go.mod")
[[ -n "$k8s_version" && -n "$helm_version" ]] || { echo "build.sh: cannot read versions from go.mod files" >&2; exit 1; }

check=0
if [[ ${1:-} == --check ]]; then check=1; shift; fi
groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || groups=(control-plane)
want_cp=0 want_node=0 want_e2e=0
for g in "${groups[@]}"; do
  case $g in
    control-plane) want_cp=1 ;;
    node) want_node=1 ;;
    e2e) want_e2e=1 ;;
    all) want_cp=1 want_node=1 want_e2e=1 ;;
    *) echo "build.sh: unknown group '$g' (control-plane, node, e2e, all)" >&2; exit 2 ;;
  esac
done

if [[ -n "${CANAL_CACHE_DIR:-}" ]]; then base=$CANAL_CACHE_DIR
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then base=$XDG_CACHE_HOME/canal
else base=$HOME/.cache/canal
fi
k8s_out=${CANAL_K8S_BIN_DIR:-$base/k8s-$k8s_version}
helm_out=$base/helm-$helm_version
export GOFLAGS=-mod=mod CGO_ENABLED=0

# Seconds each binary took on a cold build (empty Go caches, modules
# downloaded on the way) on the 2-core reference machine while other builds
# kept its load average around 12 (README, "first-run time budget"): an
# upper estimate for the progress lines. A binary without an entry gets none.
declare -A cold_seconds=([kube-apiserver]=830 [kubectl]=150 [etcd]=44 [helm]=351)

k8s_targets=""
if [[ $want_cp -eq 1 ]]; then
  k8s_targets+=" kube-apiserver=go:k8s.io/kubernetes/cmd/kube-apiserver kubectl=go:k8s.io/kubernetes/cmd/kubectl etcd=go:./cmd/etcd"
fi
if [[ $want_node -eq 1 ]]; then
  k8s_targets+=" kubelet=go:k8s.io/kubernetes/cmd/kubelet kube-proxy=go:k8s.io/kubernetes/cmd/kube-proxy"
  k8s_targets+=" kube-scheduler=go:k8s.io/kubernetes/cmd/kube-scheduler"
  k8s_targets+=" kube-controller-manager=go:k8s.io/kubernetes/cmd/kube-controller-manager"
  k8s_targets+=" pause=pause:3.10.2 agnhost=go:k8s.io/kubernetes/test/images/agnhost"
fi
if [[ $want_e2e -eq 1 ]]; then
  k8s_targets+=" e2e.test=test:k8s.io/kubernetes/test/e2e"
fi
helm_targets=""
[[ $want_cp -eq 1 ]] && helm_targets="helm=go:helm.sh/helm/v3/cmd/helm"

# missing_in DIR "name=kind:package ...": the names not built yet.
missing_in() {
  local t
  for t in $2; do [[ -x $1/${t%%=*} ]] || echo "${t%%=*}"; done
}

need_go() {
  command -v go >/dev/null && return
  echo "build.sh: Go is not installed (needed once to build the test cluster's binaries into $base): install Go >= $go_version from https://go.dev/dl/ and put its bin directory on PATH" >&2
  exit 1
}

if [[ $check -eq 1 ]]; then
  if [[ -n "$(missing_in "$k8s_out" "$k8s_targets")$(missing_in "$helm_out" "$helm_targets")" ]]; then need_go; fi
  exit 0
fi
mkdir -p "$k8s_out" "$helm_out"

mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

started=$SECONDS
step=0
total=$(( $(missing_in "$k8s_out" "$k8s_targets" | wc -l) + $(missing_in "$helm_out" "$helm_targets" | wc -l) ))
if (( total > 0 )); then
  estimate=0
  for t in $(missing_in "$k8s_out" "$k8s_targets") $(missing_in "$helm_out" "$helm_targets"); do
    estimate=$(( estimate + ${cold_seconds[$t]:-0} ))
  done
  note=""
  (( estimate > 0 )) && note=" (a first build took $(mmss $estimate) on 2 busy cores, less on an idle machine; cached per version afterwards)"
  echo "build.sh: building $total Go binar$( ((total == 1)) && echo y || echo ies) ($(echo "${groups[*]}"))$note"
fi

# heartbeat NAME STEP_START: prints a line every 30 s until killed.
heartbeat() {
  while sleep 30; do
    echo "build.sh:   ... still building $1: $(mmss $((SECONDS - $2))) on this step, $(mmss $((SECONDS - started))) in all"
  done
}

# build_one KIND PKG MODULE OUT LDFLAGS
# kind is `go` (go build), `test` (go test -c) or `pause` (gcc -static of the
# pause.c in the k8s.io/kubernetes module).
build_one() {
  local kind=$1 pkg=$2 module=$3 out=$4 ldflags=$5
  case $kind in
    go) need_go; (cd "$module" && go build -trimpath -ldflags "$ldflags" -o "$out" "$pkg") ;;
    test) need_go; (cd "$module" && go test -c -trimpath -ldflags "$ldflags" -o "$out" "$pkg") ;;
    pause)
      need_go
      local src
      src=$(cd "$module" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
      gcc -Os -static -Wall -Werror -DVERSION="$pkg" -o "$out" "$src" && strip "$out" ;;
  esac
}

# build_set DIR MODULE_DIR "name=kind:package ..." LDFLAGS
# Builds only the missing names, under a lock per directory (concurrent
# callers wait, then find them built).
build_set() {
  local out=$1 module=$2 targets=$3 ldflags=$4
  [[ -n $targets ]] || return 0
  exec 9>"$out/.build.lock"
  if ! flock -n 9; then
    [[ -n $(missing_in "$out" "$targets") ]] &&
      echo "build.sh: another build of $(basename "$out") is running; waiting for its lock ($out/.build.lock)"
    flock 9
  fi
  local missing
  missing=$(missing_in "$out" "$targets")
  if [[ -z $missing ]]; then
    echo "build.sh: $(basename "$out") present in $out"
    exec 9>&-
    return
  fi
  local tmp set_start=$SECONDS t name kind pkg est beat
  tmp=$(mktemp -d "$out/.tmp.XXXXXX")
  for t in $targets; do
    name=${t%%=*} kind=${t#*=} pkg=${kind#*:} kind=${kind%%:*}
    grep -qx "$name" <<<"$missing" || continue
    step=$((step + 1))
    est=${cold_seconds[$name]:-0}
    local step_start=$SECONDS
    echo "build.sh: [$step/$total] $name ($pkg)$( ((est > 0)) && echo ", a first build took $(mmss "$est")") [+$(mmss $((SECONDS - started)))]"
    heartbeat "$name" "$step_start" &
    beat=$!
    if ! build_one "$kind" "$pkg" "$module" "$tmp/$name" "$ldflags"; then
      kill "$beat" 2>/dev/null || true
      rm -rf "$tmp"
      echo "build.sh: building $name failed (output above)" >&2
      exit 1
    fi
    kill "$beat" 2>/dev/null || true
    wait "$beat" 2>/dev/null || true
    echo "build.sh: [$step/$total] $name built in $(mmss $((SECONDS - step_start)))"
  done
  for name in $missing; do mv "$tmp/$name" "$out/"; done
  rm -rf "$tmp"
  echo "build.sh: built $(basename "$out") into $out in $((SECONDS - set_start))s"
  exec 9>&-
}

# containerd from Debian's package, unpacked (never installed: installing
# would start a containerd service in the root namespace). Debian's 1.6 line
# works with kubelet 1.37 and costs seconds instead of the ~9 minutes of a
# containerd v2 Go build; see the README's real-cluster section.
fetch_containerd() {
  local ver out
  ver=$(apt-cache policy containerd 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
  [[ -n "$ver" && "$ver" != "(none)" ]] || { echo "build.sh: apt has no containerd package (apt-get update?)" >&2; exit 1; }
  out=$base/containerd-${ver//[:~+]/_}
  mkdir -p "$out"
  exec 8>"$out/.build.lock"
  flock 8
  if [[ -x $out/usr/bin/containerd && -x $out/usr/bin/containerd-shim-runc-v2 && -x $out/usr/bin/ctr ]]; then
    echo "build.sh: containerd $ver present in $out"
  else
    local tmp
    tmp=$(mktemp -d "$out/.tmp.XXXXXX")
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "containerd=$ver" && dpkg-deb -x ./containerd_*.deb "$tmp/root")
    cp -a "$tmp/root/." "$out/"
    rm -rf "$tmp"
    echo "build.sh: unpacked containerd $ver into $out"
  fi
  exec 8>&-
}

minor=$(cut -d. -f2 <<<"$k8s_version")
k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
build_set "$k8s_out" "$here" "$k8s_targets" "$k8s_ldflags"
build_set "$helm_out" "$here/helm" "$helm_targets" \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
if [[ $want_node -eq 1 ]]; then
  fetch_containerd
fi
