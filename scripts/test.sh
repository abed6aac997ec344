#!/usr/bin/env bash
# The stagefs test command: installs the test dependencies (scripts/setup.sh), builds the binaries
# the integration tests start, then runs every unit and integration test of the workspace.
#
#   scripts/test.sh [extra `cargo test` arguments, e.g. -- --nocapture]
#
# STAGEFS_TEST_PROFILE=release builds and tests the release binaries instead of debug ones.
# STAGEFS_CRASH_ROUNDS=N sets the number of kill/restart rounds of the crash test (default 20).
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

scripts/setup.sh

# A one-off build gains nothing from incremental state, which is the larger part of target/.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

profile="${STAGEFS_TEST_PROFILE:-debug}"
case "$profile" in
    debug) build_flags=() ;;
    release) build_flags=(--release) ;;
    *) echo "STAGEFS_TEST_PROFILE must be debug or release, not $profile" >&2; exit 2 ;;
esac

echo "test: cargo build --bins ${build_flags[*]}"
cargo build --bins "${build_flags[@]}"

# The integration tests start exactly the binaries just built.
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export STAGEFS_BIN_DIR="$target_dir/$profile"

echo "test: cargo test --workspace (binaries from $STAGEFS_BIN_DIR)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

# One closing line over every test binary (cargo's own last line is often a doc-test run of a
# crate that has none, "0 passed", which reads as if nothing ran).
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) passed += $(i - 1)
            if ($(i) ~ /^failed;?$/) failed += $(i - 1)
            if ($(i) ~ /^ignored;?$/) ignored += $(i - 1)
        }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }' "$log"
echo "test: target/ holds $(du -sh "$target_dir" 2>/dev/null | cut -f1)"

# Each failure's own output again, last: the end of a long log is what a CI page keeps, and a
# failure in the middle of the run would otherwise be named there without its message.
if [ "$status" -ne 0 ]; then
    echo "test: what each failed test printed (first 60 lines each):"
    awk '/^---- .* stdout ----$/ { shown = 0; inside = 1 }
         /^failures:$/ { inside = 0 }
         inside && shown < 60 { print substr($0, 1, 1000); shown++ }' "$log"
fi
exit "$status"
