#!/usr/bin/env bash
# Builds the C++ engine and runs its tests:  cpp/build.sh [BUILD_DIR]   (default cpp/build)
# 1. fetches the dependencies from the package registries into BUILD_DIR/deps (cpp/deps.sh; cached);
# 2. configures with CMake (Ninja when present) and builds; the sample is BUILD_DIR/wuerstchen-cpp;
# 3. runs ctest.
# Environment: WUERSTCHEN_FIXTURES=DIR (cpp/tests/make_fixtures.py's output: compare with Python),
# WUERSTCHEN_BUNDLE=DIR (a bundle for the sample's bad-bundle tests), WUERSTCHEN_REQUIRE_FIXTURES=1 (fail,
# not skip, without fixtures), SANITIZE=1 (AddressSanitizer + UndefinedBehaviorSanitizer), WUERSTCHEN_GPU=1
# (onnxruntime-gpu and the CUDA/TensorRT providers), ORT_VERSION (default 1.32.0), WUERSTCHEN_DEPS=DIR
# (default BUILD_DIR/deps), BUILD_TYPE (default Release), JOBS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(realpath -m "${1:-$here/build}")
mkdir -p "$build"

deps=$(realpath -m "${WUERSTCHEN_DEPS:-$build/deps}")  # builds may share one deps folder
"$here/deps.sh" "$deps"

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
sanitize=OFF; [[ "${SANITIZE:-0}" == 1 ]] && sanitize=ON
gpu=OFF; [[ "${WUERSTCHEN_GPU:-0}" == 1 ]] && gpu=ON
cmake -S "$here" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" -DWUERSTCHEN_DEPS="$deps" \
  -DWUERSTCHEN_SANITIZE=$sanitize -DWUERSTCHEN_GPU=$gpu \
  -DWUERSTCHEN_FIXTURES="${WUERSTCHEN_FIXTURES:-}" -DWUERSTCHEN_BUNDLE="${WUERSTCHEN_BUNDLE:-}" >/dev/null
cmake --build "$build" --parallel "${JOBS:-$(nproc)}"

# ONNX Runtime's own allocations are not leaks of ours; its library is not instrumented.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
(cd "$build" && ctest --output-on-failure --parallel "${JOBS:-$(nproc)}")
echo "build.sh: the sample is $build/wuerstchen-cpp"
