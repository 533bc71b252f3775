#!/usr/bin/env bash
# On the GPU machine, after ../shared/gpu/device-setup.sh: build, check and time one stage.
# usage: scripts/gpu-check.sh build|kernels|decoder|mrv2|throughput|ray|serving [ARGS]
#   (logs and results go to $OUT; only results written by this run are copied there)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=/root/site312:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
stamp=$(mktemp)
py=python3
case "${1:-}" in
  build)
    # Pure-Python extras that have no wheel (scripts/build-gpu-bundle.sh), then the CUDA extension
    # (csrc/) for this machine's Python and CUDA.
    [ -f .gpu-bundle/extras-py.tar.xz ] && tar xJf .gpu-bundle/extras-py.tar.xz -C /root/site312
    # vLLM finds plugins through entry points: a dist-info on PYTHONPATH is enough.
    di=/root/site312/chattts_vllm-0.1.0.dist-info; mkdir -p $di
    printf 'Metadata-Version: 2.1\nName: chattts-vllm\nVersion: 0.1.0\n' > $di/METADATA
    printf '[vllm.general_plugins]\nchattts = chattts_vllm:register\n\n[vllm.endpoint_plugins]\nchattts_speech = chattts_vllm.serving.speech:SpeechPlugin\n' > $di/entry_points.txt
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 $py setup.py build_ext --inplace 2>&1 | tail -5
    $py -c "import torch, chattts_vllm._C; print('ext ok', torch.ops.chattts_vllm.sample_codebooks)"
    nvidia-smi --query-gpu=name,memory.total --format=csv ;;
  kernels)
    $py -m pytest -q -m gpu tests/kernels/test_sample_codebooks.py tests/kernels/test_kernels_gpu.py \
      tests/audio/test_audio_stream.py 2>&1 | tee "$OUT/pytest-kernels.log" | tail -15
    $py benchmarks/kernels/bench_sample_codebooks.py 2>&1 | tee "$OUT/bench-sampler.log" | tail -12 ;;
  decoder)
    $py benchmarks/bench_decoder.py 2>&1 | tee "$OUT/bench-decoder.log" | tail -20 ;;
  mrv2)
    # -s and a timeout below the call limit, so a hang still leaves its log in $OUT.
    timeout "${MRV2_TIMEOUT:-480}" $py -m pytest -s -x -m gpu tests/gpu/test_mrv2.py ${PYTEST_K:+-k "$PYTEST_K"} \
      > "$OUT/pytest-mrv2.log" 2>&1; echo "pytest exit $?"
    grep -v "it/s\]" "$OUT/pytest-mrv2.log" | grep -v " INFO " | tail -40 ;;
  throughput)
    shift; $py benchmarks/bench_throughput.py "$@" 2>&1 | tee "$OUT/bench-throughput.log" \
      | grep -v "INFO\|it/s\]" | tail -25 ;;
  ray)
    # Ray Serve, 1 then 2 engine replicas (one GPU each, engine core in the replica process) in one
    # run (benchmarks/bench_ray.py, about 6 min). The timeout is below the call limit, so a hang
    # still leaves the log, and Ray's own logs (the replicas' output) go to $OUT when it fails.
    shift
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
    df -h /dev/shm /tmp | tail -2
    timeout -k 10 "${RAY_TIMEOUT:-520}" $py benchmarks/bench_ray.py "$@" > "$OUT/bench-ray.log" 2>&1
    rc=$?; echo "bench_ray exit $rc"
    grep -E "^\[bench_ray|^replicas=|^speedup|^wrote|Error|error:" "$OUT/bench-ray.log" | tail -40
    if [ $rc -ne 0 ]; then
      tail -30 "$OUT/bench-ray.log"
      ( cd /tmp/ray/session_latest 2>/dev/null && find logs -type f -size -20M \( -name '*.err' \
          -o -name '*.out' -o -name '*.log' \) -print0 | tar czf "$OUT/ray-logs.tar.gz" --null -T - )
      $py -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true    # frees the GPUs
    fi ;;
  serving)
    # Streaming time to first audio against a real `chattts-vllm serve` (20-layer random checkpoint,
    # benchmarks/bench_serving.py --serve): 1 and 64 concurrent 5 s streams, exact stream vs the
    # low-latency first chunk after 12 / 24 frames; about 4 min. The engine core runs in its own
    # (spawned) process, as `chattts-vllm serve` starts it; SERVE_INPROC=1 puts it in the server
    # process instead (serving/inproc.py). JSON, plot and the server's log go to $OUT.
    # SERVE_MPS=1: under an MPS daemon (private pipe dir), so the engine core's and the API
    # processes' kernels run side by side instead of time-sliced between CUDA contexts.
    shift; inproc=; [ -n "${SERVE_INPROC:-}" ] && inproc=--inproc
    [ -z "$inproc" ] && unset VLLM_ENABLE_V1_MULTIPROCESSING
    if [ -n "${SERVE_MPS:-}" ]; then
      export CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d) CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)
      nvidia-cuda-mps-control -d && echo "MPS daemon started" >> "$OUT/bench-serving-mps.log"
    fi
    timeout "${SERVING_TIMEOUT:-540}" $py benchmarks/bench_serving.py --serve random $inproc \
      --serve-args "--max-model-len 1024 --max-num-seqs 128 --gpu-memory-utilization 0.8 ${SERVE_EXTRA:-}" \
      --concurrency 1 64 --rounds 2 --first-chunk-frames 0 12 24 \
      --min-new-token 235 --max-new-token 235 --out-dir "$OUT" "$@" > "$OUT/bench-serving.log" 2>&1
    echo "bench_serving exit $?"
    [ -n "${SERVE_MPS:-}" ] && echo quit | nvidia-cuda-mps-control
    grep -v "it/s\]\|req/s\]\|req\]" "$OUT/bench-serving.log" | tail -14
    grep -E "Traceback|Error" "$OUT"/serving-*-server.log | head -5 ;;
  *) echo "usage: $0 build|kernels|decoder|mrv2|throughput|ray|serving"; exit 2 ;;
esac
find benchmarks/results -maxdepth 1 -newer "$stamp" \( -name '*.json' -o -name '*.png' \) \
  -exec cp -f {} "$OUT"/ \;
rm -f "$stamp"
