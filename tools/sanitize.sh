#!/usr/bin/env bash
# The EP under AddressSanitizer + UndefinedBehaviorSanitizer and under ThreadSanitizer. For each, builds the package
# with the sanitizer into build/sanitize-<name>/ (the venv's own install is not touched), then runs the EP tests and
# the multi-threaded stress run (tools/stress_ep.py) with that build first on PYTHONPATH.
#
#   bash tools/sanitize.sh             # asan, then tsan
#   bash tools/sanitize.sh asan        # one of them (asan | tsan)
#
# Environment: XDNA_VENV (default .venv; needs the package's [test] extra, e.g. from `bash tools/setup.sh test`),
# SANITIZE_TESTS (pytest arguments, default: the EP, kernel and fake-NPU tests), SANITIZE_STRESS_SECONDS (20),
# SANITIZE_JOBS (build jobs, 2). Needs gcc/g++ with libasan, libubsan and libtsan (Debian: gcc's own packages).
#
# Python and ONNX Runtime are not instrumented, so the sanitizer runtime is preloaded (it must come first in the
# process, and libstdc++ with it so that ASan intercepts C++ exceptions thrown across uninstrumented frames), leak
# checking is off (the interpreter keeps its allocations), and any report ends the run with a non-zero status.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${XDNA_VENV:-$repo/.venv}
py="$venv/bin/python"
stress_seconds=${SANITIZE_STRESS_SECONDS:-20}
jobs=${SANITIZE_JOBS:-2}
[ -x "$py" ] || { echo "no venv at $venv (run: bash tools/setup.sh test)" >&2; exit 2; }
if [ -n "${SANITIZE_TESTS:-}" ]; then
  read -r -a tests <<<"$SANITIZE_TESTS"
else
  tests=("$repo"/tests/test_ep_*.py "$repo/tests/test_backend_ops.py" "$repo/tests/test_kernels_emulator.py"
         "$repo/tests/test_xrt_backend.py")
fi

build() {  # name, compiler/linker flags
  local out="$repo/build/sanitize-$1"
  echo "== $1: building into $out (${jobs} jobs)"
  local t0=$SECONDS
  CMAKE_BUILD_PARALLEL_LEVEL=$jobs "$py" -m pip install -q --no-deps --upgrade --target "$out/site" \
    -C build-dir="$out/cmake" -C cmake.build-type=RelWithDebInfo \
    -C cmake.define.CMAKE_CXX_FLAGS="$2" -C cmake.define.CMAKE_SHARED_LINKER_FLAGS="$2" \
    -C cmake.define.CMAKE_MODULE_LINKER_FLAGS="$2" "$repo" 2>&1 | grep -v "^WARNING: Location" || true
  [ -f "$out/site/onnxruntime_ep_xdna/libonnxruntime_ep_xdna.so" ] || { echo "$1: build failed" >&2; exit 1; }
  echo "== $1: built in $((SECONDS - t0)) s"
}

run() {  # name, env assignments...: the tests, then the stress run, under the sanitizer
  local name=$1
  shift
  local site="$repo/build/sanitize-$name/site" reports="$repo/build/sanitize-$name/reports" t0=$SECONDS
  rm -rf "$reports" && mkdir -p "$reports"
  # Reports go to files: pytest captures the test's stderr, and the sanitizer aborts before pytest can show it.
  # numpy's OpenBLAS threads (the tests' float64 references) synchronise in uninstrumented code: one thread.
  local common=(PYTHONPATH="$site" XDNA_SKIP_REAL_MODEL=1 OPENBLAS_NUM_THREADS=1)
  local status=0 select=()
  # TSan kills a multi-threaded process's fork()ed child that starts a thread ("not supported"): the fork tests
  # run under ASan only.
  [ "$name" = tsan ] && select=(-k "not forked_child")
  echo "== $name: tests"
  (cd "$repo/tests" && env "$@" "${common[@]}" "$py" -m pytest -q -p no:cacheprovider "${select[@]}" "${tests[@]}") ||
    status=$?
  if [ $status = 0 ]; then
    echo "== $name: stress, ${stress_seconds} s"
    (cd "$repo" && env "$@" "${common[@]}" "$py" tools/stress_ep.py --seconds "$stress_seconds") || status=$?
  fi
  if compgen -G "$reports/*" >/dev/null; then
    echo "== $name: reports" && cat "$reports"/*
    status=1
  fi
  [ $status = 0 ] || { echo "== $name: FAILED" >&2; exit 1; }
  echo "== $name: clean ($((SECONDS - t0)) s)"
}

lib() { gcc -print-file-name="$1"; }

asan() {
  local flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
  build asan "$flags"
  run asan LD_PRELOAD="$(lib libasan.so) $(lib libstdc++.so)" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:log_path=$repo/build/sanitize-asan/reports/asan" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$repo/build/sanitize-asan/reports/ubsan"
}

tsan() {
  local flags="-fsanitize=thread -fno-omit-frame-pointer -g"
  build tsan "$flags"
  # ORT's own thread pool synchronises in uninstrumented code (reports inside ORT, new/delete across its threads):
  # the tests give ORT one intra-op thread (tests/ep_helpers.py); the EP's pool and the tests' threads stay.
  run tsan LD_PRELOAD="$(lib libtsan.so)" XDNA_TEST_ORT_THREADS=1 \
    TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:second_deadlock_stack=1:suppressions=$repo/tools/tsan.supp:log_path=$repo/build/sanitize-tsan/reports/tsan"
}

case "${1:-all}" in
  asan) asan ;;
  tsan) tsan ;;
  all) asan; tsan ;;
  *) echo "usage: $0 [asan|tsan|all]" >&2; exit 2 ;;
esac
echo "sanitize: ${1:-all} clean"
