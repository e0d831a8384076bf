#!/usr/bin/env bash
# The main job on a built-in demo: a throw-away HOME with a Hermes-style
# config.yaml is mounted, tokens are rotated and shown with cat, then the
# mount is detached. Nothing outside a temp dir is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
bin="$PWD/target/release/tokenfs"

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
cat > "$demo/tokenfs.toml" <<EOF2
[control]
socket = "$demo/control.sock"

[credentials.databricks]
source = "push"

[[mount]]
dir = "~/.hermes"
[[mount.file]]
path = "config.yaml"
format = "yaml"
bind = { "model.api_key" = "databricks.token" }
EOF2

cleanup() {
  fusermount3 -u "$HOME/.hermes" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$demo"
}
trap cleanup EXIT

"$bin" mount --config "$demo/tokenfs.toml" 2>"$demo/tokenfs.log" &
for _ in $(seq 100); do grep -q "fuse.tokenfs" /proc/self/mountinfo 2>/dev/null && break; sleep 0.05; done

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say "mounted over ~/.hermes; the file as every CLI sees it:"
cat "$HOME/.hermes/config.yaml"
for i in 2 3 4; do
  token=$(printf 'dapi%032d' "$i$i$i$i")
  printf %s "$token" | "$bin" set databricks --socket "$demo/control.sock"
  say "after rotation $((i - 1)): api_key is now"
  grep api_key "$HOME/.hermes/config.yaml"
done
say "other files pass through untouched:"
cat "$HOME/.hermes/notes.txt"
say "tokenfs status (fingerprints only, never tokens):"
"$bin" status --socket "$demo/control.sock"
say "detaching with fusermount3 -u; the file on disk holds a placeholder, not a token:"
fusermount3 -u "$HOME/.hermes"
wait
cat "$HOME/.hermes/config.yaml"
