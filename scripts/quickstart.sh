#!/usr/bin/env bash
# stagefs quickstart: on a fresh machine, install what is needed, build, and run the gateway end
# to end against a real S3 server on 127.0.0.1 (s3s-fs) with a file-backed staging device:
# blocks are streamed in over gRPC from many writers, acknowledged once fdatasync'd, read back
# before upload, drained to S3, the gateway is SIGKILLed with 256 MiB staged and recovers.
# Then the device is inspected offline. Everything it starts or creates is removed on exit,
# also when interrupted.
#
#   scripts/quickstart.sh            # ~2-4 minutes after the build
#   STAGEFS_QUICKSTART_DIR=/var/tmp  # where the device file goes (must support O_DIRECT: not tmpfs)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

scripts/setup.sh
cargo build --release --bins

work="$(mktemp -d "${STAGEFS_QUICKSTART_DIR:-/var/tmp}/stagefs-quickstart.XXXXXX")"
cleanup() { rm -rf -- "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

device="$work/device.img"
echo
echo "== gateway benchmark (quick) against s3s-fs, device $device"
STAGEFS_BENCH_DEVICE="$device" scripts/bench-gateway.sh --s3 --keep-device --no-build -- --quick

echo
echo "== what the device holds now (stagefs-gateway inspect, offline)"
target/release/stagefs-gateway inspect --device "$device"
