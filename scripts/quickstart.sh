#!/usr/bin/env bash
# stagefs quickstart: on a fresh machine, install what is needed, build, and run the whole thing
# on one node with embedded defaults:
#   - a local S3 server (s3s-fs on 127.0.0.1) as the object store,
#   - a gateway on a file-backed staging device with its embedded metadata engine,
#   - two FUSE mounts of it (as if on two nodes).
# It writes a checkpoint-like set of files on mount A while uploads are held, reads and verifies
# every byte on mount B before anything is uploaded, then lets the gateway drain to S3 and waits
# for it with `stagefs sync`. Everything it starts or creates is removed on exit, also when
# interrupted.
#
# With --two-gateways it runs the multi-gateway variant instead: a throwaway PostgreSQL server
# (Debian's postgresql, a cluster of its own in the work directory on a free port) holds the
# metadata, two gateways on two device files serve it, mount A uses gateway 1 and mount B
# gateway 2. Mount B reads the checkpoint from gateway 1's device (found through the registry in
# the database) before any upload, and `stagefs sync` on B waits for gateway 1's uploads.
#
#   scripts/quickstart.sh [--two-gateways]
#   STAGEFS_QUICKSTART_FILES=4 STAGEFS_QUICKSTART_FILE_MIB=512   # checkpoint size (default 4 x 512 MiB)
#   STAGEFS_QUICKSTART_DIR=/var/tmp                              # where the device goes (not tmpfs)
set -euo pipefail
gateways=1
case "${1:-}" in
    "") ;;
    --two-gateways) gateways=2 ;;
    *) echo "usage: scripts/quickstart.sh [--two-gateways]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
repo="$PWD"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

files="${STAGEFS_QUICKSTART_FILES:-4}"
file_mib="${STAGEFS_QUICKSTART_FILE_MIB:-512}"

scripts/setup.sh
cargo build --release --bins
bin="$repo/target/release"

work="$(mktemp -d "${STAGEFS_QUICKSTART_DIR:-/var/tmp}/stagefs-quickstart.XXXXXX")"
pids=()
pg_stop=()
cleanup() {
    set +e
    for m in "$work/a" "$work/b"; do
        if mountpoint -q "$m" 2>/dev/null; then
            "$bin/stagefs" umount "$m" 2>/dev/null || fusermount3 -u -z "$m"
        fi
    done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    [ "${#pg_stop[@]}" -eq 0 ] || "${pg_stop[@]}" >/dev/null 2>&1
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
step() { printf '\n== %s\n' "$*"; }

step "object store: s3s-fs on 127.0.0.1"
s3_port="$(free_port)"
mkdir -p "$work/s3/stagefs"
export AWS_ACCESS_KEY_ID=stagefs AWS_SECRET_ACCESS_KEY=stagefs-secret
s3s-fs --host 127.0.0.1 --port "$s3_port" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" >"$work/s3.log" 2>&1 &
pids+=($!)
s3_flags=(--s3-endpoint "http://127.0.0.1:$s3_port" --s3-allow-http --s3-region us-east-1)

start_gateway() { # NAME FLAGS...: starts a gateway, sets $gateway to its address
    local name="$1"; shift
    local port
    port="$(free_port)"
    gateway="127.0.0.1:$port"
    "$bin/stagefs-gateway" serve --device "$work/$name.img" --device-size "${device_mib}MiB" \
        --store s3://stagefs "${s3_flags[@]}" --listen "$gateway" --uploads-paused "$@" \
        >"$work/$name.out" 2>"$work/$name.log" &
    pids+=($!)
    # A new device file is written with zeros first (--device-fill): seconds per GiB.
    for _ in $(seq 1 1200); do grep -q "listening on" "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
    grep "listening on" "$work/$name.out" || { cat "$work/$name.log"; exit 1; }
}
device_mib=$(( files * file_mib + 1024 ))

if [ "$gateways" -eq 1 ]; then
    step "gateway: file-backed device, embedded metadata, uploads held for now"
    start_gateway gateway
    gateway_a="$gateway"
    gateway_b="$gateway"
else
    step "metadata: a throwaway PostgreSQL server"
    pg_bin="$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1)"
    pg_port="$(free_port)"
    as_pg=()
    if [ "$(id -u)" -eq 0 ]; then
        # initdb and postgres refuse to run as root.
        as_pg=(runuser -u postgres --)
        chmod 711 "$work"
        mkdir -p "$work/pg"
        chown postgres "$work/pg"
    fi
    "${as_pg[@]}" "$pg_bin/initdb" -D "$work/pg/data" --auth=trust --username=stagefs -E UTF8 \
        --no-locale --no-sync >"$work/pg-init.log"
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" -w \
        -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null
    pg_stop=("${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -m fast -w stop)
    "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U stagefs stagefs
    meta_url="postgres://stagefs@127.0.0.1:$pg_port/stagefs"
    echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') at $meta_url"

    step "two gateways on two device files, one database, uploads held for now"
    start_gateway gateway1 --meta "$meta_url"
    gateway_a="$gateway"
    start_gateway gateway2 --meta "$meta_url"
    gateway_b="$gateway"
    "$bin/stagefs" status "$gateway_b" | sed -n '/^gateways/,$p'
fi
gateway="$gateway_a"

step "two mounts: $work/a (gateway $gateway_a) and $work/b (gateway $gateway_b)"
mkdir -p "$work/a" "$work/b"
"$bin/stagefs" mount "$gateway_a" "$work/a" "${s3_flags[@]}"
"$bin/stagefs" mount "$gateway_b" "$work/b" "${s3_flags[@]}"
mount | grep "$work"

step "write a checkpoint on mount A: $files files of $file_mib MiB"
mkdir -p "$work/a/checkpoint-0001"
started=$(date +%s.%N)
for i in $(seq 1 "$files"); do
    head -c "$(( file_mib * 1024 * 1024 ))" /dev/urandom \
        | tee "$work/a/checkpoint-0001/shard-$i.bin" | sha256sum | cut -d' ' -f1 >"$work/shard-$i.sha256"
done
elapsed=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")
echo "wrote $(( files * file_mib )) MiB in ${elapsed} s (every close() returned after the data was durable on the gateway's device)"
"$bin/stagefs" status "$gateway" | grep -E "staged|queue|uploaded"

step "read and verify every byte on mount B, before any upload"
for i in $(seq 1 "$files"); do
    got=$(sha256sum "$work/b/checkpoint-0001/shard-$i.bin" | cut -d' ' -f1)
    want=$(cat "$work/shard-$i.sha256")
    [ "$got" = "$want" ] || { echo "shard-$i differs on mount B"; exit 1; }
    echo "shard-$i.bin: identical on mount B"
done
echo "objects in S3 so far: $(find "$work/s3/stagefs" -type f | wc -l)"

step "let the gateway drain to S3, and wait for it"
"$bin/stagefs" uploads resume "$gateway_a"
# On mount B: the blocks were staged by gateway A, and sync waits on the gateway that staged them.
"$bin/stagefs" sync "$work/b/checkpoint-0001"
echo "objects in S3 now: $(find "$work/s3/stagefs" -type f | wc -l)"
"$bin/stagefs" status "$gateway_b"

step "unmount"
"$bin/stagefs" umount "$work/a"
"$bin/stagefs" umount "$work/b"
echo "quickstart finished; cleaning up"
