#!/usr/bin/env bash
# Installs what the stagefs tests need on a fresh Debian machine (idempotent; run as root, or as a
# user with sudo):
#   - s3s-fs, the S3 server the integration tests upload to (cargo install, from crates.io);
#   - fuse3 (fusermount3), for the FUSE client's tests (apt).
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

if command -v fusermount3 >/dev/null 2>&1; then
    echo "setup: fuse3 already installed ($(command -v fusermount3))"
else
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "setup: fusermount3 is missing and this is not root (and there is no sudo): install fuse3" >&2
        exit 1
    fi
    echo "setup: installing fuse3 with apt-get"
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y fuse3
    echo "setup: installed fuse3 ($(command -v fusermount3))"
fi

echo "setup: done"
