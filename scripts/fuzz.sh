#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for SECONDS each (default 60) with cargo-fuzz (libFuzzer,
# nightly toolchain), installing cargo-fuzz first if it is missing. Exits non-zero when
# any target crashed; a crash leaves its input in fuzz/artifacts/TARGET/, replayed with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
#
# The seeds in fuzz/corpus/TARGET/ are only read: what the fuzzer finds goes to
# fuzz/target/corpus/TARGET/ (not in git) and is where the next run starts.
#
# Usage: scripts/fuzz.sh [SECONDS]    (FUZZ_TOOLCHAIN overrides "nightly")
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
seconds="${1:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi

failed=()
for target in $(cargo +"$toolchain" fuzz list); do
    work="$root/fuzz/target/corpus/$target"
    mkdir -p "$work"
    echo "fuzz: $target for ${seconds}s" >&2
    # stdin is closed so that no input (a secret_file = "/dev/stdin") can wait on it; an
    # input that takes more than 10 s counts as a crash (a hang).
    if ! cargo +"$toolchain" fuzz run "$target" "$work" "$root/fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 </dev/null; then
        failed+=("$target")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz: crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: no crash" >&2
