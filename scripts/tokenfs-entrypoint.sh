#!/usr/bin/env bash
# Container entrypoint: start tokenfs for a config, wait until every mount is
# live, run the given command, and detach everything when it ends or a
# signal arrives.
#
#   tokenfs-entrypoint.sh /etc/tokenfs.toml -- hermes chat
#
# Environment: TOKENFS_BIN (default: tokenfs on PATH), TOKENFS_WAIT (seconds
# to wait for the mounts, default 10), TOKENFS_LOG (daemon log file, default
# stderr). Exit status: the command's; 70 if tokenfs could not mount.
set -uo pipefail

config=${1:?usage: tokenfs-entrypoint.sh CONFIG -- COMMAND [ARGS...]}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "tokenfs-entrypoint: no command given" >&2; exit 64; }
bin=${TOKENFS_BIN:-tokenfs}
wait_s=${TOKENFS_WAIT:-10}

"$bin" check --config "$config" >/dev/null || exit 70
if [ -n "${TOKENFS_LOG:-}" ]; then
  "$bin" mount --config "$config" 2>>"$TOKENFS_LOG" &
else
  "$bin" mount --config "$config" &
fi
daemon=$!

detach() {
  kill -TERM "$daemon" 2>/dev/null
  wait "$daemon" 2>/dev/null
}

# Live = the daemon answers status and every mount is in mountinfo.
deadline=$((SECONDS + wait_s))
until dirs=$("$bin" status --json --config "$config" 2>/dev/null | python3 -c 'import json,sys; print("\n".join(m["dir"] for m in json.load(sys.stdin)["mounts"]))' 2>/dev/null) &&
      [ -n "$dirs" ] &&
      while read -r d; do awk -v d="$d" '$5 == d && $0 ~ /fuse\.tokenfs/ {found=1} END {exit !found}' /proc/self/mountinfo || exit 1; done <<<"$dirs"; do
  if ! kill -0 "$daemon" 2>/dev/null; then
    echo "tokenfs-entrypoint: tokenfs exited before mounting (see its log)" >&2
    exit 70
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "tokenfs-entrypoint: mounts not live after ${wait_s}s; giving up" >&2
    detach
    exit 70
  fi
  sleep 0.05
done

"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
wait "$child"
status=$?
# A trapped signal interrupts wait; wait again for the real exit status.
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
detach
exit $status
