#!/usr/bin/env bash
# The image and chart checks CI runs, offline: hadolint on the Dockerfile, `helm lint
# --strict` for every charts/ferry/ci/*-values.yaml, then the chart's pytest suite (which
# renders each of them, checks the manifests against the Kubernetes schemas and what the
# schemas cannot see, and runs `ferry validate` on the rendered configuration when a ferry
# binary is built).
set -euo pipefail
cd "$(dirname "$0")/.."
HELM="$(scripts/chart-tools.sh)"
export HELM
hadolint Dockerfile
for values in charts/ferry/ci/*-values.yaml; do
  "$HELM" lint --strict --quiet charts/ferry -f "$values" >/dev/null \
    || { "$HELM" lint --strict charts/ferry -f "$values"; exit 1; }
done
echo "helm lint --strict: $(ls charts/ferry/ci/*-values.yaml | wc -l) values files clean"
python3 -m pytest -q -p no:cacheprovider charts/ferry/tests
