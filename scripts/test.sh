#!/usr/bin/env bash
# Runs the whole test suite. FUSE tests really mount: they fail (never skip)
# when /dev/fuse or fusermount3 is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Real clients the tests drive (not needed to run tokenfs itself); every
# one goes under target/clients, never into the system Python.
# The Databricks SDK for Python, in its own virtualenv.
if ! target/clients/py-venv/bin/python3 -c 'import databricks.sdk' 2>/dev/null; then
  echo "setup: installing databricks-sdk (PyPI) in target/clients/py-venv" >&2
  mkdir -p target/clients
  { python3 -m venv target/clients/py-venv &&
    target/clients/py-venv/bin/pip install -q --disable-pip-version-check databricks-sdk; } >/dev/null 2>&1 ||
    echo "setup: could not install databricks-sdk; its test will fail" >&2
fi
# A real agent CLI for the end-to-end test: Claude Code, from the npm registry.
if [ ! -x target/clients/node_modules/.bin/claude ]; then
  echo "setup: installing Claude Code (npm) for the real-client test" >&2
  mkdir -p target/clients
  npm install --prefix target/clients --no-audit --no-fund --loglevel=error @anthropic-ai/claude-code@2.1.330 >/dev/null 2>&1 ||
    echo "setup: could not install Claude Code; its test will fail" >&2
fi
# Codex CLI, from the npm registry (a Rust binary; it saves auth.json by rename).
if [ ! -x target/clients/node_modules/.bin/codex ]; then
  echo "setup: installing Codex CLI (npm) for the real-client test" >&2
  mkdir -p target/clients
  npm install --prefix target/clients --no-audit --no-fund --loglevel=error @openai/codex@0.171.0 >/dev/null 2>&1 ||
    echo "setup: could not install Codex CLI; its test will fail" >&2
fi
# OpenCode, from the npm registry (its platform binary comes as an npm package).
if [ ! -x target/clients/node_modules/.bin/opencode ]; then
  echo "setup: installing OpenCode (npm) for the real-client test" >&2
  mkdir -p target/clients
  npm install --prefix target/clients --no-audit --no-fund --loglevel=error opencode-ai@1.18.33 >/dev/null 2>&1 ||
    echo "setup: could not install OpenCode; its test will fail" >&2
fi
# And Hermes Agent, from PyPI, in its own virtualenv.
if [ ! -x target/clients/hermes-venv/bin/hermes ]; then
  echo "setup: installing Hermes Agent (PyPI) for the real-client test" >&2
  mkdir -p target/clients
  { python3 -m venv target/clients/hermes-venv &&
    target/clients/hermes-venv/bin/pip install -q --disable-pip-version-check hermes-agent==0.19.0; } >/dev/null 2>&1 ||
    echo "setup: could not install Hermes Agent; its test will fail" >&2
fi
# The agents' own parsers, for the encoding test: PyYAML and python-dotenv in
# a venv under target/ (never the system Python), Node's dotenv under
# target/clients.
if ! target/test-venv/bin/python3 -c 'import yaml, dotenv' 2>/dev/null; then
  echo "setup: installing PyYAML and python-dotenv (PyPI) into target/test-venv" >&2
  python3 -m venv target/test-venv
  target/test-venv/bin/pip install -q --disable-pip-version-check pyyaml python-dotenv
fi
if [ ! -f target/clients/node_modules/dotenv/package.json ]; then
  echo "setup: installing dotenv (npm) for the encoding test" >&2
  mkdir -p target/clients
  npm install --prefix target/clients --no-audit --no-fund --loglevel=error dotenv@16 >/dev/null
fi
log=target/test.log
echo "test: running the suite; the log is $log" >&2
cargo test --release --quiet -- --test-threads=4 2>&1 | tee "$log"
# Again without kernel passthrough, as a daemon without CAP_SYS_ADMIN runs:
# every plain file's reads and writes then go through the daemon.
TOKENFS_KERNEL_PASSTHROUGH=off cargo test --release --quiet --test passthrough --test managed --test views \
  -- --test-threads=4 2>&1 | tee -a "$log"
TOKENFS_KERNEL_PASSTHROUGH=off cargo test --release --quiet --test faults setuid 2>&1 | tee -a "$log"
# One closing line for CI: totals over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tokenfs: %d passed, %d failed\n", p, f; exit (f > 0) }' "$log"
