#!/usr/bin/env bash
# Runs the e2e suite against a kind cluster (needs Docker, kind, kubectl and internet access for
# the kind node image and kwok's release manifest). See e2e/kind/README.md.
#
#   e2e/kind/run.sh [pytest args...]
#
# Environment:
#   KIND_CLUSTER_NAME   default tandem-e2e (reused if it exists)
#   KIND_NODE_IMAGE     e.g. kindest/node:v1.36.x; default: kind's own default image
#   KWOK_VERSION        default v0.8.0 (matches tools/kwok/go.mod)
#   KWOK_MANIFEST       default: kwok's release kwok.yaml for KWOK_VERSION (controller + CRDs)
#   FLEET               default e2e/fleets/demo.yaml
#   KEEP_CLUSTER=1      keep the kind cluster afterwards (default: delete it if this script made it)
#   PYTHON              default .venv/bin/python
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

name=${KIND_CLUSTER_NAME:-tandem-e2e}
kwok_version=${KWOK_VERSION:-v0.8.0}
kwok_manifest=${KWOK_MANIFEST:-https://github.com/kubernetes-sigs/kwok/releases/download/${kwok_version}/kwok.yaml}
fleet=${FLEET:-e2e/fleets/demo.yaml}
python=${PYTHON:-.venv/bin/python}
state=.tandem/kind
kubeconfig=$state/kubeconfig
mkdir -p "$state"

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is required" >&2; exit 2; }
done

created=0
if kind get clusters 2>/dev/null | grep -qx "$name"; then
  echo "run.sh: reusing kind cluster $name" >&2
  kind export kubeconfig --name "$name" --kubeconfig "$kubeconfig"
else
  image_args=()
  [ -n "${KIND_NODE_IMAGE:-}" ] && image_args=(--image "$KIND_NODE_IMAGE")
  kind create cluster --name "$name" --config e2e/kind/kind-config.yaml --kubeconfig "$kubeconfig" \
    --wait 120s ${image_args[@]+"${image_args[@]}"}
  created=1
fi
cleanup() {
  if [ "$created" = 1 ] && [ "${KEEP_CLUSTER:-0}" != 1 ]; then
    kind delete cluster --name "$name" --kubeconfig "$kubeconfig" || true
  fi
}
trap cleanup EXIT
export KUBECONFIG=$root/$kubeconfig

# kwok controller in the cluster. Its release config manages only nodes annotated
# kwok.x-k8s.io/node=fake (our fleet's nodes) and reads stages from Stage objects, so apply
# the same stages the local cluster uses.
kubectl apply -f "$kwok_manifest"
kubectl -n kube-system rollout status deployment/kwok-controller --timeout=180s
kubectl wait --for=condition=Established crd/stages.kwok.x-k8s.io --timeout=60s
kubectl apply -f e2e/kwok/stages.yaml

"$python" -m e2e.harness.fleet register "$fleet" --kubeconfig "$KUBECONFIG"

TANDEM_E2E_EXTERNAL=1 TANDEM_E2E_KUBECONFIG=$KUBECONFIG "$python" -m pytest e2e "$@"
