#!/usr/bin/env bash
# llama.cpp's tokenizer suite (models/ggml-vocab-*.gguf + .inp/.out, 75 MB unpacked) for
# tests/test_vocab_suite.py, taken from llama-cpp-python's source distribution (vendor/llama.cpp; the
# download is the whole sdist). Idempotent; without --download does nothing when the suite is already
# where the test looks first ($INFER_LLAMACPP_SRC, /work/llamacpp/src). Prints the tree it found or made.
# Usage: tests/fetch_llamacpp_vocabs.sh [--download] [VERSION]
#        -> ${INFER_TEST_CACHE:-~/.cache/infer-tests}/llama.cpp-VERSION/models/ggml-vocab-*
set -euo pipefail
force=0; [ "${1:-}" = --download ] && { force=1; shift; }
ver=${1:-0.3.36}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
[ -x "$py" ] || py=python3
if [ $force = 0 ]; then
  for tree in ${INFER_LLAMACPP_SRC:-} /work/llamacpp/src; do
    if compgen -G "$tree/models/ggml-vocab-*.gguf.inp" >/dev/null; then echo "$tree"; exit 0; fi
  done
fi
out=${INFER_TEST_CACHE:-$HOME/.cache/infer-tests}/llama.cpp-$ver
if [ ! -f "$out/.complete" ]; then
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  "$py" -m pip download -q --no-deps --no-binary :all: -d "$dl" "llama-cpp-python==$ver" >&2
  rm -rf "$out" && mkdir -p "$out"
  # llama_cpp_python-VER/vendor/llama.cpp/models/ggml-vocab-*  ->  $out/models/ggml-vocab-*
  tar -xzf "$dl"/llama_cpp_python-*.tar.gz -C "$out" --strip-components=3 --wildcards \
      '*/vendor/llama.cpp/models/ggml-vocab-*'
  touch "$out/.complete"
fi
echo "$out"
