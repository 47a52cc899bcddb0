#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Linux machine with Rust:
# starts the local SQS/SNS emulator and checks the local RabbitMQ and Redis (starting
# them if they are installed but down), installs Chromium for the status page's browser
# tests, then builds and tests everything, every backend.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/moto.sh
scripts/services.sh
# The status page's tests drive a headless Chromium through chromedriver.
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (for the status page's browser tests)..."
    apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver fonts-liberation </dev/null >/dev/null
  else
    echo "'chromedriver' is not installed: install the chromium and chromium-driver packages (apt-get install chromium chromium-driver), or run this as root to let it do so" >&2
    exit 1
  fi
fi
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export FERRY_TEST_SQS_ENDPOINT="${FERRY_TEST_SQS_ENDPOINT:-http://127.0.0.1:4566}"

# The end-to-end tests run the real binaries (ferry, the custom-backend example), so
# build every binary first, with every backend.
cargo build --workspace --bins --all-features
cargo test --workspace --all-features "$@"
