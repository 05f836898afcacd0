#!/usr/bin/env bash
# Build the GPU check's binaries here (release, stripped) into .gpu/ so a GPU machine without a
# Rust toolchain can run benches/gpu_check.sh. .gpu/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
cargo build --release -p wrpo-cli
cp "${CARGO_TARGET_DIR:-target}/release/wrpo-engine" .gpu/wrpo-engine
exe() { sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | head -n1; }
cp "$(cargo test --release -p wrpo-kernels --no-run --message-format=json 2>/dev/null | exe)" .gpu/kernels-tests
cp "$(cargo test --release -p wrpo-tests --test parity --no-run --message-format=json 2>/dev/null | exe)" .gpu/parity-tests
strip .gpu/* || true
ls -la .gpu
# The device tool carries at most 64 MiB: ship the binaries compressed.
tar -C .gpu -czf .gpu/bin.tar.gz wrpo-engine kernels-tests parity-tests
rm .gpu/wrpo-engine .gpu/kernels-tests .gpu/parity-tests
ls -la .gpu
