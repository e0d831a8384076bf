#!/usr/bin/env bash
# Runs the whole test suite. FUSE tests really mount: they fail (never skip)
# when /dev/fuse or fusermount3 is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --quiet -- --test-threads=4 2>&1 | tee /tmp/tokenfs-test.log
# One closing line for CI: totals over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tokenfs: %d passed, %d failed\n", p, f; exit (f > 0) }' /tmp/tokenfs-test.log
