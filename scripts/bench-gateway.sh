#!/usr/bin/env bash
# Benchmarks a stagefs gateway against the raw limits of its device and object store.
#
# Builds the release binaries, then runs
#   target/release/stagefs bench gateway --device $STAGEFS_BENCH_DEVICE [ARGS...]
# which starts its own stagefs-gateway on that device file (see `stagefs bench gateway --help`).
# The device file is deleted afterwards unless --keep-device is given.
#
# Usage: scripts/bench-gateway.sh [--s3] [--keep-device] [--no-build] [--] [ARGS...]
#   --s3           start s3s-fs on a free local port and bench against s3://bucket on it
#                  (instead of the default file:// store in a temporary directory)
#   --keep-device  keep the device file afterwards
#   --no-build     do not run `cargo build --release --bins` first
#   ARGS           passed to `stagefs bench gateway` (e.g. --quick, --json, --io-engine psync)
#
# Environment:
#   STAGEFS_BENCH_DEVICE       device file [/var/tmp/stagefs-bench.img]; must not be on tmpfs
#   STAGEFS_BENCH_KEEP_DEVICE  1 = same as --keep-device
#   STAGEFS_BENCH_S3           1 = same as --s3
#   CARGO                      cargo binary [cargo]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
device="${STAGEFS_BENCH_DEVICE:-/var/tmp/stagefs-bench.img}"
keep_device="${STAGEFS_BENCH_KEEP_DEVICE:-0}"
use_s3="${STAGEFS_BENCH_S3:-0}"
build=1

while [[ $# -gt 0 ]]; do
  case "$1" in
    --s3) use_s3=1; shift ;;
    --keep-device) keep_device=1; shift ;;
    --no-build) build=0; shift ;;
    --) shift; break ;;
    -h|--help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0 ;;
    *) break ;;
  esac
done

log() { echo "[bench-gateway.sh] $*" >&2; }

s3_pid=""
s3_root=""
cleanup() {
  local rc=$?
  if [[ -n "$s3_pid" ]]; then
    kill "$s3_pid" 2>/dev/null || true
    wait "$s3_pid" 2>/dev/null || true
  fi
  if [[ -n "$s3_root" ]]; then
    rm -rf -- "$s3_root" "$s3_root.log"
  fi
  if [[ "$keep_device" != 1 ]]; then
    rm -f -- "$device"
  else
    log "kept device file $device"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$repo"
if [[ "$build" == 1 ]]; then
  log "building release binaries"
  "${CARGO:-cargo}" build --release --bins >&2
fi
stagefs="$repo/target/release/stagefs"
[[ -x "$stagefs" ]] || { log "missing $stagefs (build with: cargo build --release --bins)"; exit 1; }

extra=()
if [[ "$use_s3" == 1 ]]; then
  s3s_fs="$(command -v s3s-fs || true)"
  [[ -n "$s3s_fs" ]] || { log "s3s-fs not found on PATH (install it with scripts/setup.sh)"; exit 1; }
  s3_root="$(mktemp -d "${TMPDIR:-/tmp}/stagefs-bench-s3.XXXXXX")"
  mkdir -p "$s3_root/bucket"
  # A free port: bind port 0 and read what the kernel picked.
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000)))"
  log "starting s3s-fs on 127.0.0.1:$port, root $s3_root"
  "$s3s_fs" --host 127.0.0.1 --port "$port" --access-key stagefs --secret-key stagefs-secret "$s3_root" \
    >"$s3_root.log" 2>&1 &
  s3_pid=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    if ! kill -0 "$s3_pid" 2>/dev/null; then
      log "s3s-fs exited:"; cat "$s3_root.log" >&2; exit 1
    fi
    sleep 0.1
  done
  export AWS_ACCESS_KEY_ID=stagefs AWS_SECRET_ACCESS_KEY=stagefs-secret AWS_REGION=us-east-1
  extra=(--store s3://bucket --s3-endpoint "http://127.0.0.1:$port" --s3-allow-http --s3-region us-east-1)
fi

log "running: $stagefs bench gateway --device $device ${extra[*]} $*"
set +e
"$stagefs" bench gateway --device "$device" ${extra[@]+"${extra[@]}"} "$@"
rc=$?
set -e
exit "$rc"
