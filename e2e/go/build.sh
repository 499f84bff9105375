#!/usr/bin/env bash
# Builds the real tools canal's tests and lab run, from Go modules, into a
# per-version cache outside the repository:
#   <cache>/k8s-<version>/{kube-apiserver,kubectl,etcd}  (k8s.io/kubernetes with its
#     staging modules pinned by replace directives; etcd from go.etcd.io)
#   <cache>/helm-<version>/helm                           (helm.sh/helm/v3)
# where <cache> is $CANAL_CACHE_DIR, else $XDG_CACHE_HOME/canal, else ~/.cache/canal.
# Does nothing for a set whose binaries are already there.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")
helm_version=$(awk '$1 == "require" && $2 == "helm.sh/helm/v3" { print $3; exit }' "$here/helm/go.mod")
[[ -n "$k8s_version" && -n "$helm_version" ]] || { echo "build.sh: cannot read versions from go.mod files" >&2; exit 1; }

if [[ -n "${CANAL_CACHE_DIR:-}" ]]; then base=$CANAL_CACHE_DIR
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then base=$XDG_CACHE_HOME/canal
else base=$HOME/.cache/canal
fi
k8s_out=${CANAL_K8S_BIN_DIR:-$base/k8s-$k8s_version}
helm_out=$base/helm-$helm_version
mkdir -p "$k8s_out" "$helm_out"
export GOFLAGS=-mod=mod CGO_ENABLED=0

# build_set DIR MODULE_DIR "name=package ..." LDFLAGS
build_set() {
  local out=$1 module=$2 targets=$3 ldflags=$4
  exec 9>"$out/.build.lock"
  flock 9
  local missing=0 t
  for t in $targets; do [[ -x $out/${t%%=*} ]] || missing=1; done
  if [[ $missing -eq 0 ]]; then
    echo "build.sh: $(basename "$out") present in $out"
    exec 9>&-
    return
  fi
  command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
  local tmp start=$SECONDS
  tmp=$(mktemp -d "$out/.tmp.XXXXXX")
  for t in $targets; do
    (cd "$module" && go build -trimpath -ldflags "$ldflags" -o "$tmp/${t%%=*}" "${t#*=}")
  done
  for t in $targets; do mv "$tmp/${t%%=*}" "$out/"; done
  rm -rf "$tmp"
  echo "build.sh: built $(basename "$out") into $out in $((SECONDS - start))s"
  exec 9>&-
}

minor=$(cut -d. -f2 <<<"$k8s_version")
k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
build_set "$k8s_out" "$here" \
  "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl etcd=./cmd/etcd" \
  "$k8s_ldflags"
build_set "$helm_out" "$here/helm" \
  "helm=helm.sh/helm/v3/cmd/helm" \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
