#!/usr/bin/env bash
# Install the comparison engines for bench/anchors/run_anchors.py into $ANCHORS_DIR
# (default ~/.cache/headrace-anchors), outside the project. Idempotent: a step whose
# output exists is skipped. Heavy steps run under `nice -n 19`; builds use $JOBS (2) jobs.
#
#   ANCHORS_DIR=/work/anchors bench/anchors/setup.sh
#
# Needs: python3 (with venv), cmake, a C++ compiler, the project's .venv (for the source
# model), access to PyPI. Not run by tests or CI.
set -euo pipefail

ANCHORS_DIR=${ANCHORS_DIR:-$HOME/.cache/headrace-anchors}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}  # its vendor/llama.cpp is built
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}  # empty: PyPI only (offline mirrors)
WITH_CT2=${WITH_CT2:-1}
NICE=(nice -n 19)

mkdir -p "$ANCHORS_DIR"
cd "$ANCHORS_DIR"
log() { echo "[setup] $*" >&2; }

# 1. The source model: the project's default (SmolLM2-135M-Instruct, from its GGUF) as an HF
#    directory. Run outside the repo: its `kernels/` package would shadow HF's `kernels`.
if [ ! -f hf-model/config.json ]; then
    src=${MODEL_DIR:-$("$REPO/.venv/bin/python" -c \
        "from worker.models.source import resolve_model; print(resolve_model('smollm2'))" | tail -n1)}
    log "source model: $src"
    mkdir -p hf-model.tmp
    for f in "$src"/*; do
        [ "$(basename "$f")" = config.json ] || ln -sf "$f" hf-model.tmp/
    done
    # convert_hf_to_gguf.py needs `architectures`, which the converted config lacks.
    "$PYTHON" - "$src/config.json" hf-model.tmp/config.json <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))
config.setdefault("architectures", ["LlamaForCausalLM"])
json.dump(config, open(sys.argv[2], "w"), indent=2)
EOF
    rm -rf hf-model && mv hf-model.tmp hf-model
fi

# 2. venv-ov: OpenVINO GenAI, optimum-intel (export), gguf conversion deps, CTranslate2.
if [ ! -x venv-ov/bin/python ]; then
    "$PYTHON" -m venv venv-ov
fi
PIP=("${NICE[@]}" venv-ov/bin/pip install -q)
if ! venv-ov/bin/python -c "import openvino_genai, optimum.intel, sentencepiece" 2>/dev/null; then
    echo "torch==$TORCH_VERSION" > torch-pin.txt  # keeps optimum-intel from pulling CUDA torch
    "${PIP[@]}" "torch==$TORCH_VERSION" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
    "${PIP[@]}" -c torch-pin.txt openvino-genai "optimum-intel[openvino]" sentencepiece
    # torchvision from PyPI is built for CUDA torch: with CPU torch its import breaks
    # `import transformers`. Nothing here uses it.
    venv-ov/bin/pip uninstall -q -y torchvision || true
fi
if [ "$WITH_CT2" = 1 ] && ! venv-ov/bin/python -c "import ctranslate2" 2>/dev/null; then
    "${PIP[@]}" -c torch-pin.txt ctranslate2 || log "ctranslate2 not installed; skipping it"
fi

# 3. OpenVINO IRs (with openvino_tokenizer/detokenizer.xml, which the pipeline needs).
for fmt in fp16 int8; do
    if [ ! -f "ov-$fmt/openvino_detokenizer.xml" ]; then
        log "exporting ov-$fmt"
        rm -rf "ov-$fmt"
        "${NICE[@]}" venv-ov/bin/optimum-cli export openvino --model hf-model \
            --task text-generation-with-past --weight-format "$fmt" "ov-$fmt"
    fi
done

# 4. llama.cpp: the llama.cpp vendored in the llama-cpp-python sdist.
LLAMA_SRC=src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp
if [ ! -f "$LLAMA_SRC/CMakeLists.txt" ]; then
    mkdir -p src
    "${NICE[@]}" venv-ov/bin/pip download -q --no-deps --no-binary :all: -d src \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C src
fi
# GCC 12's _tile_loadconfig declares an 8-byte read, so the compiler drops the stores that
# fill the tile config and ggml's AMX kernels (Q8_0 prompt batches) die with SIGILL.
MMQ=$LLAMA_SRC/ggml/src/ggml-cpu/amx/mmq.cpp
if [ -f "$MMQ" ] && ! grep -q headrace-anchors "$MMQ"; then
    sed -i 's|^    _tile_loadconfig(&tc);|    __asm__ __volatile__("" : : "r"(\&tc) : "memory");  // headrace-anchors: keep the tc stores\n    _tile_loadconfig(\&tc);|' "$MMQ"
    grep -q headrace-anchors "$MMQ" || log "warning: the AMX tile-config fix did not apply"
fi
if [ ! -x llama-build/bin/llama-server ] || [ ! -x llama-build/bin/llama-batched-bench ] \
    || [ ! -x llama-build/bin/llama-quantize ]; then
    "${NICE[@]}" cmake -S "$LLAMA_SRC" -B llama-build -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF
    "${NICE[@]}" cmake --build llama-build -j "$JOBS" \
        --target llama-batched-bench llama-quantize llama-server
fi
mkdir -p gguf
if [ ! -f gguf/model-f16.gguf ]; then
    "${NICE[@]}" venv-ov/bin/python "$LLAMA_SRC/convert_hf_to_gguf.py" hf-model \
        --outtype f16 --outfile gguf/model-f16.gguf.tmp
    mv gguf/model-f16.gguf.tmp gguf/model-f16.gguf
fi
if [ ! -f gguf/model-q8_0.gguf ]; then
    "${NICE[@]}" llama-build/bin/llama-quantize gguf/model-f16.gguf gguf/model-q8_0.gguf.tmp Q8_0
    mv gguf/model-q8_0.gguf.tmp gguf/model-q8_0.gguf
fi

# 5. CTranslate2 (optional): int8 weights.
if [ "$WITH_CT2" = 1 ] && venv-ov/bin/python -c "import ctranslate2" 2>/dev/null \
    && [ ! -f ct2-int8/model.bin ]; then
    "${NICE[@]}" venv-ov/bin/ct2-transformers-converter --model hf-model \
        --output_dir ct2-int8 --quantization int8 --force
fi

log "done: $ANCHORS_DIR"
