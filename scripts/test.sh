#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Linux machine with Rust:
# starts the local SQS/SNS emulator if it is not running, then builds and tests everything.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/moto.sh
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export FERRY_TEST_SQS_ENDPOINT="${FERRY_TEST_SQS_ENDPOINT:-http://127.0.0.1:4566}"

# The end-to-end tests run the real `ferry` binary, so build every binary first.
cargo build --workspace --bins
cargo test --workspace "$@"
