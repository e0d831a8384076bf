#!/usr/bin/env bash
# Benchmarks tokenfs side by side with the kernel floor, bindfs and file
# rotators, in one run; prints a table (or --json). Not part of CI.
#   scripts/bench.sh [--json] [--idle SECS] [--storm SECS] [--proxy-secs SECS] [--only read,fsync,stat,bulk,rotation,storm,footprint,databricks,proxy]
#   scripts/bench.sh --soak 3600      (1 h soak: RSS and fds must stay flat)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v bindfs >/dev/null || { apt-get update -qq >/dev/null; apt-get install -y -qq bindfs >/dev/null; }
command -v taskset >/dev/null || { apt-get install -y -qq util-linux >/dev/null; }
cargo build --release --quiet --bin tokenfs --example bench
echo "kernel $(uname -r), $(nproc) CPUs"
exec target/release/examples/bench "$@"
