#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Linux machine with Rust:
# starts the local SQS/SNS emulator and checks the local RabbitMQ and Redis (starting
# them if they are installed but down), then builds and tests everything, every backend.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/moto.sh
scripts/services.sh
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export FERRY_TEST_SQS_ENDPOINT="${FERRY_TEST_SQS_ENDPOINT:-http://127.0.0.1:4566}"

# The end-to-end tests run the real binaries (ferry, the custom-backend example), so
# build every binary first, with every backend.
cargo build --workspace --bins --all-features
cargo test --workspace --all-features "$@"
