#!/usr/bin/env bash
# Builds the real tools canal's tests and lab run, from Go modules (and two
# Debian packages), into a per-version cache outside the repository.
#
#   build.sh [GROUP...]      GROUP: control-plane (the default), node, e2e, all
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
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")
helm_version=$(awk '$1 == "require" && $2 == "helm.sh/helm/v3" { print $3; exit }' "$here/helm/go.mod")
[[ -n "$k8s_version" && -n "$helm_version" ]] || { echo "build.sh: cannot read versions from go.mod files" >&2; exit 1; }

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
mkdir -p "$k8s_out" "$helm_out"
export GOFLAGS=-mod=mod CGO_ENABLED=0

# build_set DIR MODULE_DIR "name=kind:package ..." LDFLAGS
# kind is `go` (go build), `test` (go test -c) or `pause` (gcc -static of the
# pause.c in the k8s.io/kubernetes module). Builds only the missing names,
# under a lock per directory (concurrent callers wait, then find them built).
build_set() {
  local out=$1 module=$2 targets=$3 ldflags=$4
  exec 9>"$out/.build.lock"
  flock 9
  local missing=() t
  for t in $targets; do [[ -x $out/${t%%=*} ]] || missing+=("$t"); done
  if [[ ${#missing[@]} -eq 0 ]]; then
    echo "build.sh: $(basename "$out") present in $out ($(for t in $targets; do printf '%s ' "${t%%=*}"; done | sed 's/ $//'))"
    exec 9>&-
    return
  fi
  local tmp start=$SECONDS name kind pkg
  tmp=$(mktemp -d "$out/.tmp.XXXXXX")
  for t in "${missing[@]}"; do
    name=${t%%=*} kind=${t#*=} pkg=${kind#*:} kind=${kind%%:*}
    local t0=$SECONDS
    case $kind in
      go|test) command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; } ;;
    esac
    case $kind in
      go) (cd "$module" && go build -trimpath -ldflags "$ldflags" -o "$tmp/$name" "$pkg") ;;
      test) (cd "$module" && go test -c -trimpath -ldflags "$ldflags" -o "$tmp/$name" "$pkg") ;;
      pause)
        local src
        src=$(cd "$module" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
        gcc -Os -static -Wall -Werror -DVERSION="$pkg" -o "$tmp/$name" "$src"
        strip "$tmp/$name" ;;
    esac
    echo "build.sh: built $name in $((SECONDS - t0))s"
  done
  for t in "${missing[@]}"; do mv "$tmp/${t%%=*}" "$out/"; done
  rm -rf "$tmp"
  echo "build.sh: built ${#missing[@]} of $(basename "$out") into $out in $((SECONDS - start))s"
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
targets=()
if [[ $want_cp -eq 1 ]]; then
  targets+=(kube-apiserver=go:k8s.io/kubernetes/cmd/kube-apiserver kubectl=go:k8s.io/kubernetes/cmd/kubectl etcd=go:./cmd/etcd)
fi
if [[ $want_node -eq 1 ]]; then
  targets+=(kubelet=go:k8s.io/kubernetes/cmd/kubelet kube-proxy=go:k8s.io/kubernetes/cmd/kube-proxy
    kube-scheduler=go:k8s.io/kubernetes/cmd/kube-scheduler
    kube-controller-manager=go:k8s.io/kubernetes/cmd/kube-controller-manager
    pause=pause:3.10.2 agnhost=go:k8s.io/kubernetes/test/images/agnhost)
fi
if [[ $want_e2e -eq 1 ]]; then
  targets+=(e2e.test=test:k8s.io/kubernetes/test/e2e)
fi
[[ ${#targets[@]} -eq 0 ]] || build_set "$k8s_out" "$here" "${targets[*]}" "$k8s_ldflags"
if [[ $want_cp -eq 1 ]]; then
  build_set "$helm_out" "$here/helm" \
    "helm=go:helm.sh/helm/v3/cmd/helm" \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
fi
if [[ $want_node -eq 1 ]]; then
  fetch_containerd
fi
