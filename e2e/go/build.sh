#!/usr/bin/env bash
# Builds the real kube-apiserver, kubectl and etcd that canal's tests and lab
# run, from Go modules (k8s.io/kubernetes with its staging modules pinned by
# replace directives, etcd from go.etcd.io), into a per-version cache outside
# the repository. Does nothing when the binaries are already there.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")
[[ -n "$version" ]] || { echo "build.sh: no k8s.io/kubernetes version in $here/go.mod" >&2; exit 1; }

if [[ -n "${CANAL_CACHE_DIR:-}" ]]; then base=$CANAL_CACHE_DIR
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then base=$XDG_CACHE_HOME/canal
else base=$HOME/.cache/canal
fi
out=${CANAL_K8S_BIN_DIR:-$base/k8s-$version}
mkdir -p "$out"

exec 9>"$out/.build.lock"
flock 9

if [[ -x $out/kube-apiserver && -x $out/kubectl && -x $out/etcd ]]; then
  echo "build.sh: $version binaries present in $out"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }
export GOFLAGS=-mod=mod CGO_ENABLED=0
tmp=$(mktemp -d "$out/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$here"
start=$SECONDS
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(cut -d. -f2 <<<"$version")"
go build -trimpath -ldflags "$ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
go build -trimpath -ldflags "$ldflags" -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" ./cmd/etcd
mv "$tmp/kube-apiserver" "$tmp/kubectl" "$tmp/etcd" "$out/"
echo "build.sh: built kube-apiserver, kubectl and etcd $version into $out in $((SECONDS - start))s"
