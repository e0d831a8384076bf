#!/usr/bin/env bash
# Container entrypoint: start tokenfs for a config, wait until its own mounts
# are live, run the given command in the foreground (with the caller's
# stdin, stdout, stderr and terminal: Ctrl-C reaches the command), and stop
# the daemon (which unmounts everything) whichever way it ends.
#
#   tokenfs-entrypoint.sh /etc/tokenfs.toml -- hermes chat
#
# Environment: TOKENFS_BIN (default: tokenfs on PATH), TOKENFS_WAIT (seconds
# to wait for the mounts, default 10), TOKENFS_LOG (daemon log file, default
# stderr). Exit status: the command's (128+N if a signal N ended it); 70,
# with a one-line reason, if tokenfs could not mount or stopped while the
# command ran; 64 for a usage error.
#
# How it ends, each path tested in tests/entrypoint.rs:
# - the command exits: the daemon gets SIGTERM and is waited for;
# - the mounts are not live in time, or the daemon exits first: exit 70;
# - SIGTERM/SIGHUP to this script: passed on to the command, then as above;
# - SIGINT: from a terminal (Ctrl-C) it already reached the command, which
#   decides; sent with kill (no terminal), it is passed on to the command;
# - the daemon dies while the command runs: the command gets SIGTERM, exit 70.
# The daemon runs in its own session, so a terminal's Ctrl-C never reaches it.
set -uo pipefail
# A closed stderr must not kill this script before it has stopped the daemon.
trap "" PIPE

say() { echo "tokenfs-entrypoint: $*" >&2; }

config=${1:-}
[ -n "$config" ] || { say "usage: tokenfs-entrypoint.sh CONFIG -- COMMAND [ARGS...]"; exit 64; }
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { say "no command given (usage: tokenfs-entrypoint.sh CONFIG -- COMMAND [ARGS...])"; exit 64; }
bin=${TOKENFS_BIN:-tokenfs}
wait_s=${TOKENFS_WAIT:-10}
case $wait_s in '' | *[!0-9.]*) say "TOKENFS_WAIT must be a number of seconds, not '$wait_s'"; exit 64 ;; esac

if ! out=$("$bin" check --config "$config" 2>&1 >/dev/null); then
  say "${out#tokenfs: }"
  exit 70
fi

daemon=""
child=""
stop_daemon() {
  [ -n "$daemon" ] || return 0
  kill -TERM "$daemon" 2>/dev/null
  # It unmounts and exits within milliseconds; a daemon that hangs is
  # killed after 10 s (fusermount3's auto-unmount then removes its mounts).
  local i
  for ((i = 0; i < 200; i++)); do
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.05
  done
  kill -KILL "$daemon" 2>/dev/null
  wait "$daemon" 2>/dev/null
  daemon=""
}

# Until the command runs, a signal stops the daemon and exits.
trap 'stop_daemon; exit 143' TERM
trap 'stop_daemon; exit 129' HUP
trap 'stop_daemon; exit 130' INT

# Its own session: no terminal signals, no terminal input.
if [ -n "${TOKENFS_LOG:-}" ]; then
  setsid "$bin" mount --config "$config" </dev/null >/dev/null 2>>"$TOKENFS_LOG" &
else
  setsid "$bin" mount --config "$config" </dev/null >/dev/null &
fi
daemon=$!

# Live = the daemon started here answers on its socket and the kernel shows
# every one of its mounts (the daemon compares canonical paths).
deadline=$(($(date +%s%N) + $(awk -v s="$wait_s" 'BEGIN { printf "%d", s * 1000 }') * 1000000))
why="the daemon did not answer"
while :; do
  if ! kill -0 "$daemon" 2>/dev/null; then
    wait "$daemon" 2>/dev/null
    st=$?
    daemon=""
    say "tokenfs exited (status $st) before its mounts were live${TOKENFS_LOG:+ (log: $TOKENFS_LOG)}"
    exit 70
  fi
  # stdout: the answering daemon's pid; stderr: why it is not ready (its
  # logs are off: a RUST_LOG meant for the daemon must not mix in).
  if out=$(RUST_LOG=off "$bin" status --ready --config "$config" 2>&1); then
    [ "$out" = "$daemon" ] && break
    why="another tokenfs (pid $out) answers on this config's socket"
  else
    why=${out##*$'\n'}
    why=${why#tokenfs: }
  fi
  if [ "$(date +%s%N)" -ge "$deadline" ]; then
    stop_daemon
    say "mounts not live after ${wait_s}s: ${why:-no reason given}"
    exit 70
  fi
  sleep 0.05
done

# The command: this shell's process group (the terminal's foreground, so it
# reads the terminal and gets its Ctrl-C), the caller's stdin, and SIGINT
# and SIGQUIT back to their defaults (a background job would ignore them).
# A signal that comes while the command starts (the command may already
# run before this shell knows its pid) is kept and passed on just after.
pending=""
trap 'pending="$pending TERM"' TERM
trap 'pending="$pending HUP"' HUP
if [ -t 0 ]; then
  trap ':' INT            # Ctrl-C goes to the command itself
else
  trap 'pending="$pending INT"' INT
fi
( trap - INT QUIT PIPE; exec "$@" ) <&0 &
child=$!
forward() { [ -n "$child" ] && kill "-$1" "$child" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward HUP' HUP
if [ ! -t 0 ]; then
  trap 'forward INT' INT
fi
for sig in $pending; do forward "$sig"; done

status=""
while [ -z "$status" ]; do
  done_pid=""
  wait -n -p done_pid "$child" "$daemon"
  st=$?
  if [ "${done_pid:-}" = "$child" ]; then
    status=$st
  elif [ "${done_pid:-}" = "$daemon" ]; then
    daemon=""
    say "tokenfs exited (status $st) while the command ran; its files are gone: stopping the command"
    forward TERM
    while kill -0 "$child" 2>/dev/null; do wait "$child"; done
    exit 70
  fi
  # Otherwise a trapped signal interrupted the wait: wait again.
done
child=""
trap '' TERM HUP INT
stop_daemon
exit "$status"
