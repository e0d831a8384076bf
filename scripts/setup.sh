#!/usr/bin/env bash
# Installs what tokenfs needs on a fresh Debian/Ubuntu machine and builds it.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v python3 >/dev/null || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)   # tests: certificates for the proxy's TLS upstream
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  echo "setup: /dev/fuse is missing: run the container with --device /dev/fuse --cap-add SYS_ADMIN" >&2
  exit 1
fi
if [ -x target/release/tokenfs ]; then
  echo "setup: building tokenfs (release; already built, so only what changed)" >&2
else
  echo "setup: building tokenfs (release; the first build takes a few minutes: about 2 min on an idle 2-core machine)" >&2
fi
cargo build --release
