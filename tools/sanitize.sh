#!/usr/bin/env bash
# Build cpubn with AddressSanitizer + UndefinedBehaviorSanitizer in a separate virtual
# environment and run the test suite against that build.  Any out-of-bounds access, use
# after free or undefined behaviour in the kernels aborts the run with a report.
#
#   bash tools/sanitize.sh [pytest args...]      (default: the whole tests/ folder)
#
# Needs gcc (or clang) with libasan/libubsan.  Installs CI's extras but onnx (.[test,mpi]):
# onnxruntime is a prebuilt C++ runtime, not what this job checks, and its tests skip.
# The venv goes to $CPUBN_SANITIZE_VENV
# (default: a .venv-sanitize folder in the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
venv="$(realpath -m "${CPUBN_SANITIZE_VENV:-.venv-sanitize}")"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install --upgrade pip >/dev/null

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g"
# The build must really be parallel: a probe that failed under these flags would
# otherwise fall back to a serial build and hide the OpenMP paths from the sanitizers.
# Built from a copy: the install also drops the compiled modules next to the sources,
# and sanitized ones there would break ordinary runs from the checkout.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
tar --exclude='./.venv*' --exclude=./build -cf - . | tar -xf - -C "$build"
(cd "$build" && CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    CPUBN_FAIL_NO_OPENMP=1 pip install --force-reinstall ".[test,mpi]")

# Python itself is not instrumented: the ASan runtime must be loaded first.  Python's
# own allocations are not tracked, so leak checking is off (tests/kernels/test_memory.py
# checks for leaks by RSS instead).
runtime="$(${CC:-gcc} -print-file-name=libasan.so)"
cd "$venv"                        # import the sanitized install, not the checkout's copy
LD_PRELOAD="$runtime" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
PYTHONMALLOC=malloc CPUBN_SANITIZED=1 \
    python -m pytest -q -p no:cacheprovider -x "${@:-$repo/tests}"
