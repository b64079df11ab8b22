#!/usr/bin/env bash
# Builds the real binaries the local test cluster runs, from the Go modules pinned in tools/*:
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd, etcdctl, kwok, kwokctl,
# helm. Nothing is downloaded but Go modules; GOTOOLCHAIN=local so no toolchain is fetched.
#
# Binaries are cached outside the repo in $TANDEM_CACHE/bin/<key> (default ~/.cache/tandem), the
# key being a hash of every tools/*/go.mod + go.sum and of this script, so a warm run rebuilds
# nothing. Prints the directory holding the binaries as its last line of stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${TANDEM_CACHE:-$HOME/.cache/tandem}
key=$(cat "$here"/build.sh "$here"/*/go.mod "$here"/*/go.sum "$here"/k8s/VERSION | sha256sum | cut -c1-16)
out="$cache/bin/$key"
if [ -f "$out/.complete" ]; then
  echo "tools: reusing binaries in $out" >&2
  echo "$out"
  exit 0
fi
mkdir -p "$out"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false"

timed() {  # timed LABEL CMD...: runs CMD, prints how long it took
  local label=$1 t0 t1; shift
  t0=$(date +%s)
  "$@"
  t1=$(date +%s)
  echo "tools: built $label in $((t1 - t0)) s" >&2
}

KV=$(cat "$here/k8s/VERSION")
minor=${KV#v1.}; minor=${minor%%.*}
k8s_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=${KV} \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=${minor} \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=${KV} \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=${minor}"

build_k8s() {
  (cd "$here/k8s" && go build -ldflags "$k8s_ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
}
build_etcd() {
  (cd "$here/etcd" && go build -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3 \
    && go build -ldflags "-s -w" -o "$out/etcdctl" go.etcd.io/etcd/etcdctl/v3)
}
build_kwok() {
  (cd "$here/kwok" && go build -ldflags "-s -w" -o "$out/" sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok/cmd/kwokctl)
}
build_helm() {
  local hv
  hv=$(cd "$here/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)
  # Without these helm renders and lints as if the cluster were Kubernetes 1.20.
  (cd "$here/helm" && go build -o "$out/helm" -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=${hv} \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${minor} \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${minor}" \
    helm.sh/helm/v3/cmd/helm)
}

t0=$(date +%s)
timed etcd build_etcd
timed kwok build_kwok
timed helm build_helm
timed kubernetes build_k8s
echo "tools: all binaries built in $(( $(date +%s) - t0 )) s" >&2
"$out/kube-apiserver" --version >&2
touch "$out/.complete"
echo "$out"
