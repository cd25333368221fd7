#!/usr/bin/env bash
# Validates the Kubernetes manifests of deploy/ offline (no cluster; the package registries on first
# use only). scripts/test.sh runs it, so CI does. About 10 s with warm caches.
#   1. deploy/validate/check.py: every object against the Kubernetes 1.30 and 1.37 API schemas,
#      strictly (unknown fields are errors; kubernetes-validate, pinned with its dependencies in
#      deploy/validate/requirements.txt, carries the schemas), and the cross-references schemas
#      cannot see (ConfigMaps, claims, Secrets, ports, probes, selectors, the admin key that run-time
#      adapter loading needs, HPA metrics vs inferd's gauges in src/http/metrics.rs and
#      prometheus-adapter's rules, the config.toml files of the manifests and the images).
#   2. deploy/validate/servicemonitor.mjs: the ServiceMonitor (a prometheus-operator CRD, which
#      kubernetes-validate has no schema for) against validators generated from its CRD schema
#      (@kubernetes-models/prometheus-operator 6.0.0 from npm, locked with integrity hashes in
#      deploy/validate/package-lock.json). Needs node and npm; skipped with a message without them,
#      unless INFERD_REQUIRE_NODE=1.
# Both install under .venv/deploy-validate/ (gitignored). PYTHON: the Python that makes the venv.
#
#   deploy/validate.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
work="$root/.venv/deploy-validate"
venv="$work/venv"
mkdir -p "$work"

if [ ! -x "$venv/bin/python" ]; then "${PYTHON:-python3}" -m venv "$venv"; fi
if ! cmp -s deploy/validate/requirements.txt "$work/requirements.txt"; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r deploy/validate/requirements.txt
    cp deploy/validate/requirements.txt "$work/requirements.txt"
fi

status=0
"$venv/bin/python" deploy/validate/check.py "$work/crds.json" || status=1

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "deploy/validate.sh: no node/npm: the ServiceMonitor's CRD check is skipped" >&2
    [ "${INFERD_REQUIRE_NODE:-0}" = 1 ] && exit 1
    exit $status
fi
if ! cmp -s deploy/validate/package-lock.json "$work/package-lock.json" || [ ! -d "$work/node_modules" ]; then
    cp deploy/validate/package.json deploy/validate/package-lock.json "$work/"
    (cd "$work" && npm ci --silent --no-audit --no-fund --ignore-scripts)
fi
cp deploy/validate/servicemonitor.mjs "$work/"
node "$work/servicemonitor.mjs" "$work/crds.json" || status=1
exit $status
