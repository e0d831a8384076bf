#!/usr/bin/env bash
# The main job on a built-in demo: a throw-away HOME with a Hermes-style
# config.yaml is mounted, tokens are rotated and shown with cat, then the
# mount is detached. Nothing outside a temp dir is touched, and another
# tokenfs running on this machine is left alone.
#
# TOKENFS_BIN=path/to/tokenfs skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step() { printf 'demo: %s\n' "$*" >&2; }

step "this demo builds tokenfs, mounts it over a throw-away ~/.hermes, rotates the token three times, and detaches"
if [ -n "${TOKENFS_BIN:-}" ]; then
  bin=$TOKENFS_BIN
else
  step "building (cargo's progress follows; the first build takes a few minutes)"
  scripts/setup.sh
  bin="$PWD/target/release/tokenfs"
fi

demo=$(mktemp -d /tmp/tokenfs-demo.XXXXXX)
export HOME="$demo/home"
mkdir -p "$HOME/.hermes"
cat > "$HOME/.hermes/config.yaml" <<'YAML'
# Hermes agent config (a stand-in written by the demo)
model:
  provider: custom
  base_url: https://example.cloud.databricks.com/serving-endpoints
  api_key: dapi00000000000000000000000000000001
  default: databricks-claude-sonnet
agent:
  max_turns: 60
YAML
echo "hello from a file tokenfs does not manage" > "$HOME/.hermes/notes.txt"
sock="$demo/control.sock"
cat > "$demo/tokenfs.toml" <<EOF2
[control]
socket = "$sock"

[credentials.databricks]
source = "push"

[[mount]]
dir = "~/.hermes"
[[mount.file]]
path = "config.yaml"
format = "yaml"
bind = { "model.api_key" = "databricks.token" }
EOF2

daemon=""
cleanup() {
  if [ -n "$daemon" ]; then
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
  fi
  rm -rf "$demo"
}
trap cleanup EXIT

step "mounting $HOME/.hermes (log: $demo/tokenfs.log)"
"$bin" mount --config "$demo/tokenfs.toml" 2>"$demo/tokenfs.log" &
daemon=$!
# Ready = this daemon (not another tokenfs) answers on this socket and its
# mount is live.
for _ in $(seq 200); do
  if ! kill -0 "$daemon" 2>/dev/null; then
    step "tokenfs did not start:"; cat "$demo/tokenfs.log" >&2; daemon=""; exit 1
  fi
  [ "$("$bin" status --ready --socket "$sock" 2>/dev/null)" = "$daemon" ] && break
  sleep 0.05
done
[ "$("$bin" status --ready --socket "$sock" 2>&1)" = "$daemon" ] ||
  { step "the mount was not live after 10 s:"; cat "$demo/tokenfs.log" >&2; exit 1; }

say "mounted over ~/.hermes; the file as every CLI sees it:"
cat "$HOME/.hermes/config.yaml"
for i in 2 3 4; do
  token=$(printf 'dapi%032d' "$i$i$i$i")
  step "rotating: tokenfs set databricks (the token goes on stdin, never argv)"
  printf %s "$token" | "$bin" set databricks --socket "$sock"
  say "after rotation $((i - 1)): api_key is now"
  grep api_key "$HOME/.hermes/config.yaml"
done
say "other files pass through untouched:"
cat "$HOME/.hermes/notes.txt"
say "tokenfs status (fingerprints only, never tokens):"
"$bin" status --socket "$sock"
say "detaching with fusermount3 -u; the file on disk holds a placeholder, not a token:"
fusermount3 -u "$HOME/.hermes"
wait "$daemon"
daemon=""
cat "$HOME/.hermes/config.yaml"
step "done: the daemon exited by itself once its mount was gone"
