#!/usr/bin/env bash
# Installs what the stagefs tests need on a fresh Debian machine (idempotent; run as root, or as a
# user with sudo):
#   - s3s-fs, the S3 server the integration tests upload to (cargo install, from crates.io);
#   - fuse3 (fusermount3), for the FUSE client's tests (apt);
#   - fonts-dejavu-core, the font of the `stagefs bench fs` chart (apt).
set -euo pipefail

S3S_FS_VERSION=0.14.1
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if command -v s3s-fs >/dev/null 2>&1; then
    echo "setup: s3s-fs already installed at $(command -v s3s-fs) ($(s3s-fs --version 2>/dev/null || echo 'version unknown'))"
else
    echo "setup: installing s3s-fs $S3S_FS_VERSION with cargo install"
    cargo install s3s-fs --version "$S3S_FS_VERSION" --locked --features binary
    echo "setup: installed s3s-fs at $(command -v s3s-fs)"
fi

# Debian packages: fuse3 for the mounts, a TrueType font for the `stagefs bench fs` chart.
missing=()
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup: fuse3 ($(command -v fusermount3)) and the chart font already installed"
else
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "setup: ${missing[*]} missing and this is not root (and there is no sudo): install them" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]} with apt-get"
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    command -v fusermount3 >/dev/null 2>&1 || { echo "setup: fusermount3 still missing" >&2; exit 1; }
fi

echo "setup: done"
