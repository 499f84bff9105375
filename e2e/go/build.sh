#!/usr/bin/env bash
# Builds the real tools canal's tests and lab run, from Go modules, into a
# per-version cache outside the repository:
#   <cache>/k8s-<version>/{kube-apiserver,kubectl,etcd}  (k8s.io/kubernetes with its
#     staging modules pinned by replace directives; etcd from go.etcd.io)
#   <cache>/helm-<version>/helm                           (helm.sh/helm/v3)
# where <cache> is $CANAL_CACHE_DIR, else $XDG_CACHE_HOME/canal, else ~/.cache/canal.
# Does nothing for a set whose binaries are already there.
#
# `build.sh --check` only says whether a build is needed and possible: exit 0
# when everything is cached or Go is installed, else one line naming the fix.
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

k8s_targets="kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl etcd=./cmd/etcd"
helm_targets="helm=helm.sh/helm/v3/cmd/helm"

# missing_in DIR "name=package ...": the names not built yet.
missing_in() {
  local t
  for t in $2; do [[ -x $1/${t%%=*} ]] || echo "${t%%=*}"; done
}

need_go() {
  command -v go >/dev/null && return
  echo "build.sh: Go is not installed (needed once to build the test control plane into $base): install Go >= $go_version from https://go.dev/dl/ and put its bin directory on PATH" >&2
  exit 1
}

if [[ ${1:-} == --check ]]; then
  if [[ -n "$(missing_in "$k8s_out" "$k8s_targets")$(missing_in "$helm_out" "$helm_targets")" ]]; then need_go; fi
  exit 0
fi

mmss() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

started=$SECONDS
step=0
total=$(( $(missing_in "$k8s_out" "$k8s_targets" | wc -l) + $(missing_in "$helm_out" "$helm_targets" | wc -l) ))
if (( total > 0 )); then
  need_go
  estimate=0
  for t in $(missing_in "$k8s_out" "$k8s_targets") $(missing_in "$helm_out" "$helm_targets"); do
    estimate=$(( estimate + ${cold_seconds[$t]:-0} ))
  done
  note=""
  (( estimate > 0 )) && note=" (a first build took $(mmss $estimate) on 2 busy cores, less on an idle machine; cached per version afterwards)"
  echo "build.sh: building $total Go binar$( ((total == 1)) && echo y || echo ies) of the test control plane$note"
fi

# heartbeat NAME STEP_START: prints a line every 30 s until killed.
heartbeat() {
  while sleep 30; do
    echo "build.sh:   ... still building $1: $(mmss $((SECONDS - $2))) on this step, $(mmss $((SECONDS - started))) in all"
  done
}

# build_set DIR MODULE_DIR "name=package ..." LDFLAGS
build_set() {
  local out=$1 module=$2 targets=$3 ldflags=$4
  mkdir -p "$out"
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
  need_go
  local tmp set_start=$SECONDS t name est beat
  tmp=$(mktemp -d "$out/.tmp.XXXXXX")
  for t in $targets; do
    name=${t%%=*}
    grep -qx "$name" <<<"$missing" || continue
    step=$((step + 1))
    est=${cold_seconds[$name]:-0}
    local step_start=$SECONDS
    echo "build.sh: [$step/$total] $name (${t#*=})$( ((est > 0)) && echo ", a first build took $(mmss "$est")") [+$(mmss $((SECONDS - started)))]"
    heartbeat "$name" "$step_start" &
    beat=$!
    if ! (cd "$module" && go build -trimpath -ldflags "$ldflags" -o "$tmp/$name" "${t#*=}"); then
      kill "$beat" 2>/dev/null || true
      rm -rf "$tmp"
      echo "build.sh: building $name failed (go output above)" >&2
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

minor=$(cut -d. -f2 <<<"$k8s_version")
k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
build_set "$k8s_out" "$here" "$k8s_targets" "$k8s_ldflags"
build_set "$helm_out" "$here/helm" "$helm_targets" \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
