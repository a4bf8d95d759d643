#!/usr/bin/env bash
# Every GPU check of zeropad in one run, for a short lease on a CUDA machine (about 9 minutes on one H200):
# packed throughput / MFU, text and VLM (issue 16's figures, first: a lease cut short still has them), then the
# bf16 exactness of the CUDA attention kernels, the cpu_offload test, and cpu_offload's memory and speed. Logs go
# to $OUT (default gpu_out/). Packages the machine lacks can be put as wheels in .wheels/ beforehand (they are
# installed with --no-deps, offline).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg TQDM_DISABLE=1
PY=${PYTHON:-python3}
if compgen -G ".wheels/*.whl" > /dev/null; then
  $PY -m pip install -q --no-deps --no-index .wheels/*.whl 2>&1 | tail -3
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
# issue 16's configuration: 16k-token packs; zeropad's own step (chunked loss), then with train.compile
timeout 330 $PY benchmarks/gpu_throughput.py --max-tokens 16384 --steps 8 --warmup 3 \
  --methods padded,zeropad-step,zeropad-compiled 2>&1 | tail -14 | tee "$OUT/throughput.log"
# issue 16's VLM figure: the Qwen2.5-VL-3B shape on image conversations, zeropad's packs alone (MFU counts the
# language model per real token and the vision tower per patch). 8k-token packs: `zeropad plan` puts the language
# model at 105 GB without checkpointing (bf16 autocast, fp32 AdamW), leaving ~30 GB for the tower's activations
timeout 200 $PY benchmarks/vlm_throughput.py --device cuda --dtype bf16 --model 3b --max-tokens 8192 \
  --batch-sizes "" --records 600 --steps 6 --warmup 2 --threads 8 2>&1 | grep -v "^\[transformers\]" | tail -12 \
  | tee "$OUT/vlm_throughput.log"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests/parallel/test_cpu_offload.py 2>&1 | tail -20 | tee "$OUT/tests.log"
timeout 120 $PY benchmarks/cuda_exactness.py 2>&1 | grep -v "^\[transformers\]" | tail -12 | tee "$OUT/exactness.log"
timeout 200 $PY benchmarks/cpu_offload.py 2>&1 | tail -12 | tee "$OUT/cpu_offload.log"
