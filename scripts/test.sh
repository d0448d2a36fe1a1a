#!/usr/bin/env bash
# The project's test command: installs what is missing, then checks
# formatting and lints, and runs every test (real KVM where /dev/kvm exists).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked --release
cargo test --workspace --locked --release -- --test-threads=2
