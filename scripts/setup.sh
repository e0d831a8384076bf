#!/usr/bin/env bash
# Installs what tokenfs needs on a fresh Debian/Ubuntu machine and builds it.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The real-client test uses the Databricks SDK for Python.
if ! python3 -c 'import databricks.sdk' 2>/dev/null; then
  echo "setup: installing databricks-sdk (PyPI)" >&2
  python3 -m pip install -q --disable-pip-version-check databricks-sdk 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages databricks-sdk
fi
# A real agent CLI for the end-to-end test: Claude Code, from the npm registry.
if [ ! -x target/clients/node_modules/.bin/claude ]; then
  echo "setup: installing Claude Code (npm) for the real-client test" >&2
  mkdir -p target/clients
  npm install --prefix target/clients --no-audit --no-fund --loglevel=error @anthropic-ai/claude-code@2.1.330 >/dev/null 2>&1 ||
    echo "setup: could not install Claude Code; its test will fail" >&2
fi
if [ ! -e /dev/fuse ]; then
  echo "setup: /dev/fuse is missing: run the container with --device /dev/fuse --cap-add SYS_ADMIN" >&2
  exit 1
fi
cargo build --release --quiet
