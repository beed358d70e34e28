#!/usr/bin/env bash
# Builds llama.cpp's own server, `llama-server`, for the side-by-side
# throughput measure of `serve_throughput.py --llama-server`: from the
# llama.cpp source that the `llama-cpp-python` sdist on PyPI ships under
# vendor/llama.cpp (the engine the tests compare with), for AVX2 + FMA
# (see features.md, "Beside llama.cpp": the default native build of that
# version crashes on AVX-512 hosts). About 10 minutes on 2 cores.
#
#   bash benches/build_llama_server.sh [DIR]
#
# Prints the path of the binary (DIR/build/bin/llama-server; DIR defaults
# to target/llama-server).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-target/llama-server}"
version=0.3.36
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
src="$dir/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -d "$src" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$dir"
  tar -xzf "$dir/llama_cpp_python-$version.tar.gz" -C "$dir"
fi
cmake -S "$src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  >/dev/null
cmake --build "$dir/build" --target llama-server -j "$(nproc)" >/dev/null
echo "$dir/build/bin/llama-server"
