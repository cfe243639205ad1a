# IRG inference server on NVIDIA GPUs.
#
#   docker build -t irg-server .
#   docker run --gpus all -p 8000:8000 -v /path/to/BAGEL-7B-MoT:/weights:ro \
#     -e IRG_MODEL=/weights --stop-timeout 45 irg-server
#
# Without IRG_MODEL the container serves the embedded tiny random model (built into the image).
# Every server flag is also an IRG_* variable (see `irg-server --help`).
#
# The torch / xformers pair: torch 2.13.0 from PyPI is built for CUDA 13.0 (its wheels bring
# their own CUDA libraries, cuDNN included), so both stages use CUDA 13.0 images. No published
# xformers wheel is built against torch 2.13 / CUDA 13 (0.0.35's targets torch 2.10 / CUDA 12.8
# and its kernels do not load here), so the first stage compiles the pinned xformers release
# against the pinned torch. That takes a while: narrow TORCH_CUDA_ARCH_LIST to your GPUs
# (--build-arg TORCH_CUDA_ARCH_LIST=9.0 for H100 / H200) to shorten it. xformers stays optional
# at run time: the engine's default attention backend is torch-native.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

# ---- stage 1: xformers wheel, compiled against the image's torch ------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS xformers
ARG TORCH_VERSION=2.13.0
ARG XFORMERS_VERSION=0.0.35
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's python3 is whatever the pinned base tag ships; pinning its apt version too would only
# break the build when the archive moves on (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" ninja==1.13.0 setuptools==80.9.0 \
      wheel==0.45.1
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" FORCE_CUDA=1 \
    pip wheel --no-cache-dir --no-deps --no-build-isolation --no-binary xformers \
      -w /wheels "xformers==${XFORMERS_VERSION}"

# ---- stage 2: the server --------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS server
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc, libc and the Python headers: Triton (it comes with torch's CUDA wheels) compiles its
# kernel launchers with them on first use; without them the fused kernels fall back to torch ops.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 irg \
    && useradd --system --create-home --uid 10001 --gid 10001 irg
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

COPY --from=xformers /wheels /tmp/wheels
# The compiled xformers first, so the gpu extra finds it satisfied; torch pinned in the same
# call as the project so pip never swaps in another CUDA build.
RUN pip install --no-cache-dir /tmp/wheels/xformers-*.whl "torch==${TORCH_VERSION}" \
    && rm -rf /tmp/wheels
COPY pyproject.toml README.md ./
COPY irg_engine ./irg_engine
COPY server ./server
COPY weights/README.md ./weights/README.md
# Editable, so the embedded default model is written under /app/weights, not site-packages.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" -e ".[gpu]" \
    && python -c "from irg_engine.generate import ensure_default_model; ensure_default_model()" \
    && mkdir -p /weights \
    && chown -R 10001:10001 /app/weights /weights

USER 10001
ENV IRG_HOST=0.0.0.0 \
    IRG_PORT=8000 \
    IRG_SHUTDOWN_TIMEOUT=30
EXPOSE 8000
# Mount a BAGEL-layout checkpoint here and set IRG_MODEL=/weights.
VOLUME ["/weights"]
# /ready turns 200 once the weights are loaded (30 GB can take minutes) and the engine is up.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["sh", "-c", "irg --server http://127.0.0.1:${IRG_PORT} --timeout 8 health"]
CMD ["irg-server"]
