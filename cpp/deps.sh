#!/usr/bin/env bash
# Fetches what the C++ build needs from the package registries, into DEPS_DIR (default cpp/build/deps):
#   onnxruntime/lib      libonnxruntime.so.* from PyPI's `onnxruntime` wheel (or `onnxruntime-gpu` with WUERSTCHEN_GPU=1)
#   onnxruntime/include  ONNX Runtime's C/C++ headers from Debian trixie's libonnxruntime-dev (no wheel ships them)
#   nlohmann/include     nlohmann/json from Debian trixie's nlohmann-json3-dev
#   clip/bpe_simple_vocab_16e6.txt  CLIP's BPE vocabulary from PyPI's open-clip-torch wheel (tests only)
# Debian packages are fetched with a private apt state and unpacked with dpkg-deb -x: nothing is installed.
# Each part is skipped when already there, so a second run is instant.
set -euo pipefail

deps=$(realpath -m "${1:-$(dirname "$0")/build/deps}")
ort_version=${ORT_VERSION:-1.32.0}
ort_package=onnxruntime
[[ "${WUERSTCHEN_GPU:-0}" == 1 ]] && ort_package=onnxruntime-gpu
python=${PYTHON:-python3}
mkdir -p "$deps"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pip_download() {  # a wheel by requirement, without its dependencies
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work/wheels" "$1"
}

# 1. The ONNX Runtime library. The stamp names the package and version, so changing ORT_VERSION refetches.
ort_stamp="$deps/onnxruntime/lib/.${ort_package}-${ort_version}"
if [[ ! -f "$ort_stamp" ]]; then
  echo "deps: $ort_package==$ort_version (PyPI)"
  rm -rf "$deps/onnxruntime/lib" && mkdir -p "$deps/onnxruntime/lib"
  pip_download "$ort_package==$ort_version"
  wheel=$(ls "$work"/wheels/onnxruntime*.whl)
  "$python" - "$wheel" "$deps/onnxruntime/lib" <<'PY'
import sys, zipfile, pathlib
wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if name.startswith("onnxruntime/capi/libonnxruntime") and ".so" in base:
            (out / base).write_bytes(z.read(name))
PY
  lib=$(cd "$deps/onnxruntime/lib" && ls libonnxruntime.so.*.*.* | head -1)
  ln -sf "$lib" "$deps/onnxruntime/lib/libonnxruntime.so.1"
  ln -sf "$lib" "$deps/onnxruntime/lib/libonnxruntime.so"
  touch "$ort_stamp"
fi

# 2. Headers from Debian trixie, through a private apt state over the mirror this machine already uses.
if [[ ! -f "$deps/onnxruntime/include/onnxruntime_cxx_api.h" || ! -f "$deps/nlohmann/include/nlohmann/json.hpp" ]]; then
  mirror=${DEBIAN_MIRROR:-}
  if [[ -z "$mirror" ]]; then
    mirror=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}';
               grep -hs '^deb ' /etc/apt/sources.list | sed -E 's/\[[^]]*\] *//' | awk '{print $2}') |
             grep -v security | head -1 || true)
  fi
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "deps: libonnxruntime-dev, nlohmann-json3-dev (Debian trixie from $mirror)"
  apt_dir="$work/apt"
  mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$work/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$apt_dir/sources.list"
  apt_options=(-o "Dir::State=$apt_dir/state" -o "Dir::Cache=$apt_dir/cache" -o "Dir::Etc::SourceList=$apt_dir/sources.list"
               -o "Dir::Etc::SourceParts=/dev/null" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
  apt-get "${apt_options[@]}" -qq update
  (cd "$work/debs" && apt-get "${apt_options[@]}" -qq download libonnxruntime-dev nlohmann-json3-dev)
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
  rm -rf "$deps/onnxruntime/include" "$deps/nlohmann"
  mkdir -p "$deps/onnxruntime" "$deps/nlohmann"
  cp -r "$work/root/usr/include/onnxruntime" "$deps/onnxruntime/include"
  cp -r "$work/root/usr/include" "$deps/nlohmann/include"
  rm -rf "$deps/nlohmann/include/onnxruntime"
fi

# 3. CLIP's vocabulary, for the tokenizer tests against transformers.
if [[ ! -f "$deps/clip/bpe_simple_vocab_16e6.txt" ]]; then
  echo "deps: open-clip-torch (PyPI), for CLIP's BPE vocabulary"
  mkdir -p "$deps/clip"
  pip_download open-clip-torch
  "$python" - "$(ls "$work"/wheels/open_clip_torch*.whl)" "$deps/clip/bpe_simple_vocab_16e6.txt" <<'PY'
import gzip, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
open(sys.argv[2], "wb").write(data)
PY
fi
echo "deps: ready in $deps"
