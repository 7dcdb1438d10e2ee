#!/usr/bin/env bash
# GPU stages, run on the lent GPU (H200 now) through the device tool (see README, "GPU").
#   bash scripts/gpu_run.sh STAGE [STAGE ...]
# Stages: env | kernels | kernels-quick | kernels-public (tests + quick) | hostcost | stream | connector | connector-async-off | transport | fanout |
#         fanout-graphs | fanout-scale | fanout-profile | fanout-blocks | weights | weights-quick | weights-sd | weights-tests | attention | share | paths
# vLLM stages need vLLM 0.26 on PYTHONPATH first (source ../shared/gpu's vllm_env.sh).
# Wheels the GPU image lacks (google-crc32c, platformdirs) travel in .whl/ and go to /tmp/pp.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/thaw-out}"
mkdir -p "$OUT" /tmp/pp
export THAW_AGENTS_CACHE=/tmp/thaw-cache PYTHONUNBUFFERED=1
ln -sfn "$PWD/triton_kernels" /tmp/pp/thaw_kernels   # the package's install name
if [ -d .whl ] && [ ! -d /tmp/pp/google_crc32c ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pp .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/pp:${PYTHONPATH:-}"
# vLLM installed by an earlier call on this warm machine (vllm_env.sh): the same exports.
if [ -d /tmp/site/vllm ]; then
  case ":$PYTHONPATH:" in *":/tmp/site:"*) ;; *) export PYTHONPATH="$PYTHONPATH:/tmp/site" ;; esac
  export PATH="$PATH:/tmp/site/bin" VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false \
    VLLM_WORKER_MULTIPROC_METHOD="${VLLM_WORKER_MULTIPROC_METHOD:-spawn}"
fi
status=0
kernel_tests() {  # the KV gather/scatter and CRC32C GPU tests (both KV host paths)
  timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests/unit/test_kv_blocks.py tests/unit/test_crc32c.py -m gpu \
    -k "public_path or tiles_cuda or matches_reference_cuda or gather_scatter_cuda or chunk_crc32c_cuda" || status=1
}
touch /tmp/thaw-gpu-run-start  # only results written by this run go to $OUT (8 files come back)
for stage in "$@"; do
  echo "===== stage $stage"
  case "$stage" in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
         df -h /dev/shm /tmp | cat
         python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" ;;
    kernels) kernel_tests; timeout 400 python3 benchmarks/kernels.py || status=1 ;;
    kernels-quick) timeout 200 python3 benchmarks/kernels.py --quick || status=1 ;;
    kernels-public) kernel_tests; timeout 200 python3 benchmarks/kernels.py --quick || status=1 ;;
    hostcost) timeout 200 python3 benchmarks/kv_host_cost.py || status=1 ;;
    stream) timeout 240 python3 benchmarks/stream_scheduler.py || status=1 ;;
    connector) timeout 560 python3 -m pytest -q -p no:cacheprovider -x tests/integration/test_connector.py || status=1 ;;
    transport) timeout 120 python3 -m pytest -q -p no:cacheprovider -x tests/unit/test_kv_transport.py -m gpu || status=1
               timeout 500 python3 benchmarks/kv_transport.py || status=1 ;;
    fanout) timeout 560 python3 benchmarks/fork_fanout.py --gpu || status=1 ;;
    fanout-graphs) timeout 560 python3 benchmarks/fork_fanout.py --gpu --graphs --no-pool || status=1 ;;
    weights) timeout 560 python3 benchmarks/weights.py || status=1 ;;
    weights-quick) timeout 400 python3 benchmarks/weights.py --quick || status=1 ;;
    weights-sd) timeout 300 python3 benchmarks/weights.py --quick --no-cold || status=1 ;;
    weights-tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests/unit/test_weights_format.py -m gpu || status=1 ;;
    attention) timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/unit/test_shared_prefix_attention.py -m gpu || status=1
               timeout 200 python3 benchmarks/shared_prefix_attention.py || status=1 ;;
    share) timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/integration/test_device_share.py -m gpu || status=1
           timeout 240 python3 benchmarks/device_share.py || status=1 ;;
    paths) timeout 300 python3 benchmarks/host_paths.py --sections "${PATHS_SECTIONS:-write_read,thaw,ipc}" || status=1 ;;
    fanout-scale) timeout 590 python3 benchmarks/fanout_scale.py || status=1 ;;
    fanout-profile) timeout 500 python3 benchmarks/fanout_scale.py --profile || status=1 ;;
    fanout-blocks) timeout 560 python3 benchmarks/fanout_scale.py --batches 256 --block-sizes 16,64 || status=1 ;;
    connector-async-off) THAW_CONNECTOR_ASYNC_SCHEDULING=0 timeout 300 python3 -m pytest -q -p no:cacheprovider \
               tests/integration/test_connector.py -k "flipped_byte or loads_and_matches" || status=1 ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  find benchmarks/results -maxdepth 1 -name '*.json' -newer /tmp/thaw-gpu-run-start \
    -exec cp {} "$OUT"/ \; 2>/dev/null || true
done
exit $status
