#!/usr/bin/env bash
# Builds llama.cpp's own llama-server (the anchor `bench serving` compares against) from the
# llama.cpp sources vendored in the pinned llama-cpp-python sdist, into .venv/bin/llama-server.
# CPU build; one-off (a few minutes on 2 cores). Usage: scripts/build-llama-server.sh [.venv]
set -euo pipefail
VENV="${1:-.venv}"
VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
SRC="$VENV/src/llama-cpp-python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  mkdir -p "$VENV/src"
  "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$VENV/src"
  tar -xzf "$VENV/src/llama_cpp_python-$VERSION.tar.gz" -C "$VENV/src"
  mv "$VENV/src/llama_cpp_python-$VERSION" "$SRC"
fi
BUILD="$SRC/build-server"
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF > /dev/null
cmake --build "$BUILD" --target llama-server -j "$(nproc)" > /dev/null
cp "$BUILD/bin/llama-server" "$VENV/bin/llama-server"
echo "built $VENV/bin/llama-server (llama.cpp from llama-cpp-python $VERSION)"
