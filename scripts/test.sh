#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs and starts the test services, then checks
# formatting and lints and runs every test against the real servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# Builds are cached outside the clone so repeated runs (and CI on this machine) stay fast.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/sluice-target}
export SLUICE_SERVICES=${SLUICE_SERVICES:-/var/tmp/sluice-services}
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
# --lib --bins --tests: there are no doc tests, and an empty doc-test run must not be the last word.
set +e
cargo test --workspace --locked --lib --bins --tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
