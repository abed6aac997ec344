#!/usr/bin/env bash
# Benchmarks the file system end to end through real FUSE mounts: stagefs gateway mode against
# write-through to a store with cloud latency, against the raw device and local directories.
#
# Installs what it needs (scripts/setup.sh: s3s-fs, fuse3, the chart font), builds the release
# binaries, then runs
#   target/release/stagefs bench fs --chart bench-fs.png [ARGS...]
# which starts its own s3s-fs, latency proxy, gateway and mounts in a scratch directory under
# /var/tmp (see `stagefs bench fs --help`). The table goes to stdout (or JSON with --json); the
# chart to bench-fs.png (or --chart PATH).
#
# Usage: scripts/bench-fs.sh [--no-build] [--] [ARGS...]
#   --no-build   do not run setup and `cargo build --release --bins` first
#   ARGS         passed to `stagefs bench fs` (e.g. --quick, --json, --store-delay 50ms,
#                --checkpoint-size 4GiB, --small-files 50000)
#
# A full run (the defaults: 4 x 1 GiB checkpoint, 10,000 small files, 1,000 appends, untar of
# 5,000 files) takes about 15 minutes on 2 cores; --quick about one minute.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-build) build=0; shift ;;
    --) shift; break ;;
    -h|--help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0 ;;
    *) break ;;
  esac
done

cd "$repo"
if [[ "$build" == 1 ]]; then
  scripts/setup.sh >&2
  "${CARGO:-cargo}" build --release --bins >&2
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
exec target/release/stagefs bench fs --chart "$repo/bench-fs.png" "$@"
