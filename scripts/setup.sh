#!/usr/bin/env bash
# Installs what the stagefs tests need on a fresh Debian machine (idempotent; run as root, or as a
# user with sudo):
#   - s3s-fs, the S3 server the integration tests upload to (cargo install, from crates.io);
#   - fuse3 (fusermount3), for the FUSE client's tests (apt);
#   - fonts-dejavu-core, the font of the `stagefs bench fs` chart (apt);
#   - postgresql (initdb, postgres, psql), for the metadata tests and benchmarks, which start
#     throwaway servers of their own (apt; the "main" cluster Debian may create is not used).
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

# The newest PostgreSQL server's initdb (the version gateway/meta/src/pg_cluster.rs runs); fails if
# there is none.
newest_initdb() { compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1; }

# Debian packages: fuse3 for the mounts, a TrueType font for the `stagefs bench fs` chart,
# postgresql (which brings postgresql-client) for the metadata tests, openssl for the
# certificates the TLS tests make.
missing=()
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
newest_initdb >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup: fuse3 ($(command -v fusermount3)), openssl, the chart font and postgresql ($(newest_initdb)) already installed"
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
    newest_initdb >/dev/null || { echo "setup: postgresql's initdb still missing" >&2; exit 1; }
fi

echo "setup: done"
