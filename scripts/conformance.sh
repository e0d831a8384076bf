#!/usr/bin/env bash
# POSIX conformance of the passthrough: runs pjdfstest (the Rust port) on a
# plain directory and on a tokenfs mount of a sibling directory of the same
# filesystem, and prints both pass counts side by side, then every test that
# passes on the plain directory but not through tokenfs.
#
#   scripts/conformance.sh [PATTERN...]     (needs root: pjdfstest switches users)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v setfacl >/dev/null || { apt-get update -qq >/dev/null; apt-get install -y -qq acl libacl1-dev >/dev/null; }
command -v pjdfstest >/dev/null || cargo install --locked --quiet pjdfstest
command -v fio >/dev/null || { apt-get update -qq >/dev/null; apt-get install -y -qq fio >/dev/null; }
bin="$PWD/target/release/tokenfs"

work=$(mktemp -d /tmp/tokenfs-conformance.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/plain" "$work/mnt/sub"
chmod 777 "$work/plain" "$work/mnt/sub"
cat > "$work/pjdfstest.toml" <<'EOF2'
[settings]
naptime = 0.02
[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
EOF2
echo "token = placeholder" > "$work/mnt/managed.ini"
cat > "$work/tokenfs.toml" <<EOF2
[control]
socket = "$work/ctl.sock"
[credentials.t]
source = "push"
[[mount]]
dir = "$work/mnt"
allow_other = true
[[mount.file]]
path = "managed.ini"
format = "dotenv"
bind = { "token" = "t.token" }
EOF2

cleanup() {
  fusermount3 -u -z "$work/mnt" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

run() { # dir log
  (cd "$1" && pjdfstest -c "$work/pjdfstest.toml" -p "$1" -- "${@:3}" >"$2" 2>&1) || true
}
summary() { # log -> "N passed, N failed, N skipped"
  printf '%d passed, %d failed, %d skipped' "$(grep -cE ' ok$' "$1")" "$(grep -cE ' FAILED$' "$1")" "$(grep -cE ' skipped$' "$1")"
}

run "$work/plain" "$work/plain.log" "$@"
"$bin" mount --config "$work/tokenfs.toml" 2>"$work/tokenfs.log" &
for _ in $(seq 200); do grep -q " $work/mnt .*fuse.tokenfs" /proc/self/mountinfo && break; sleep 0.05; done
run "$work/mnt/sub" "$work/tokenfs.log.txt" "$@"

# Data integrity: fio writes and verifies (crc32c) a file through the mount
# while two processes create, rename and unlink small files next to it.
churn() { for i in $(seq 2000); do echo "$1 $i" > "$2/c$1.$i"; mv "$2/c$1.$i" "$2/d$1.$i"; rm "$2/d$1.$i"; done; }
mkdir -p "$work/mnt/sub/fio"
churn a "$work/mnt/sub/fio" & c1=$!
churn b "$work/mnt/sub/fio" & c2=$!
fio --name=verify --filename="$work/mnt/sub/fio/data" --size=64m --bs=4k --rw=randrw --ioengine=psync \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --numjobs=1 --output="$work/fio.txt" >/dev/null 2>&1 && fio_ok=0 || fio_ok=$?
wait $c1 $c2
fio_errors=$(grep -oE 'err= *[0-9]+' "$work/fio.txt" | head -1 | grep -oE '[0-9]+$' || echo "?")

printf '%-26s %s\n' "directory" "pjdfstest" "plain ($(stat -f -c %T "$work"))" "$(summary "$work/plain.log")" "tokenfs passthrough" "$(summary "$work/tokenfs.log.txt")"
echo "fio randrw 64 MiB with crc32c verify under create/rename/unlink churn: exit $fio_ok, err=$fio_errors"
failed() { grep -E ' FAILED$' "$1" | awk '{print $1}' | sort -u; }
comm -13 <(failed "$work/plain.log") <(failed "$work/tokenfs.log.txt") > "$work/regressions" || true
if [ -s "$work/regressions" ]; then
  echo; echo "passing on the plain directory, failing through tokenfs:"; sed 's/^/  /' "$work/regressions"
  [ -n "${CONFORMANCE_LOG:-}" ] && cp "$work/tokenfs.log.txt" "$CONFORMANCE_LOG"
fi
