#!/usr/bin/env bash
# One GPU verification round on a 2-GPU machine, in calls that fit the device limits (10 min a call,
# 8 files back): every stage runs its jobs on both cards at once, logs to $OUT, and packs them into
# one $OUT/<stage>.tgz (results JSON and plots included). Prints a short summary last.
#
#   (after .gpu-bundle/device-setup.sh, see ../shared/gpu/README.md)
#   bash scripts/gpu-plan.sh build      # csrc extension, frame-sink check                  (~1 min)
#   bash scripts/gpu-plan.sh check      # card 0: decoder bench, then throughput + stock    (~9 min)
#                                       # card 1: GPU tests (kernels, audio, glue, MRv2), then
#                                       #         the host profile of ChatTTS and stock
#   bash scripts/gpu-plan.sh scale      # card 0: serving TTFA, coalesced audio vs per-stream (~9 min)
#                                       # card 1: several engines per GPU (2, 3), bf16 KV
#   bash scripts/gpu-plan.sh extra      # card 0: engines with an fp8 KV cache (1, 2), then   (~9 min)
#                                       #         the GPU server test (tests/gpu/test_serve_gpu.py)
#                                       # card 1: serving TTFA, engine core in the server process
#                                       #         with coalesced audio (one CUDA context, no
#                                       #         time-slicing between engine and audio)
#   bash scripts/gpu-plan.sh ray        # both cards: Ray Serve 1 -> 2 replicas               (~5 min)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT/w"
W=$OUT/w
export PYTHONPATH=/root/site312:$PWD PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 OUT=$W
[ -f .gpu-bundle/extras-py.tar.xz ] && [ -d /root/site312 ] && tar xJf .gpu-bundle/extras-py.tar.xz -C /root/site312
stamp=$(mktemp)
py=python3
quiet() { grep -v "INFO\|it/s\]\|req/s\]\|req\]" "$@"; }

case "${1:-}" in
  build)
    bash scripts/gpu-check.sh build 2>&1 | tail -4
    $py -c "import torch, chattts_vllm.ops; print('native frame sink:', hasattr(torch.ops.chattts_vllm, 'write_frame_records'))"
    timeout 60 $py -m pytest -q tests/runners/test_frame_sink.py 2>&1 | tail -1 ;;
  check)
    ( export CUDA_VISIBLE_DEVICES=0
      timeout 170 $py benchmarks/bench_decoder.py > $W/decoder.log 2>&1; echo "decoder rc $?" >> $W/decoder.log
      timeout 340 $py benchmarks/bench_throughput.py --batches 1 512 --time-limit 330 > $W/throughput.log 2>&1
      echo "throughput rc $?" >> $W/throughput.log ) &
    ( export CUDA_VISIBLE_DEVICES=1
      for e in "" --stock; do
        timeout 100 $py benchmarks/profile_gpt_step.py --batch 512 --frames 100 $e > $W/profile${e:+-stock}.log 2>&1
      done
      SERVING_TIMEOUT=260 OUT=$W bash scripts/gpu-check.sh serving --first-chunk-frames 0 12 --tag coalesced \
        > /dev/null 2>&1 ) &
    wait
    quiet $W/decoder.log | grep -A10 "^impl " ; tail -1 $W/decoder.log
    quiet $W/throughput.log | grep -A8 "^ batch"; tail -1 $W/throughput.log
    for f in $W/bench-serving*.log; do quiet "$f" | grep -A7 "mode  conc"; done
    grep -h "^== \|^-- thread\|^   [a-z]" $W/profile*.log | head -60 ;;
  scale)
    ( export CUDA_VISIBLE_DEVICES=0
      SERVING_TIMEOUT=250 OUT=$W bash scripts/gpu-check.sh serving --first-chunk-frames 0 12 --tag coalesced > /dev/null 2>&1
      CHATTTS_VLLM_AUDIO_COALESCE=0 SERVING_TIMEOUT=250 OUT=$W bash scripts/gpu-check.sh serving \
        --first-chunk-frames 0 12 --tag per-stream > /dev/null 2>&1 ) &
    ( export CUDA_VISIBLE_DEVICES=1
      timeout 500 $py benchmarks/bench_throughput.py --engines 2 3 --batches 512 --skip-stock --time-limit 490 \
        > $W/engines.log 2>&1; echo "engines rc $?" >> $W/engines.log ) &
    wait
    for f in $W/bench-serving*.log; do quiet "$f" | grep -A7 "mode  conc"; done
    grep -h "round\|best\|rc " $W/engines*.log ;;
  extra)
    ( export CUDA_VISIBLE_DEVICES=0
      timeout 340 $py benchmarks/bench_throughput.py --engines 1 2 --batches 512 --kv-cache-dtype fp8 --skip-stock \
        --time-limit 330 > $W/engines-fp8.log 2>&1; echo "engines fp8 rc $?" >> $W/engines-fp8.log
      timeout 200 $py -m pytest -q -m gpu tests/gpu/test_serve_gpu.py > $W/pytest-serve.log 2>&1
      echo "pytest serve rc $?" >> $W/pytest-serve.log ) &
    ( export CUDA_VISIBLE_DEVICES=1
      SERVE_INPROC=1 SERVING_TIMEOUT=300 OUT=$W bash scripts/gpu-check.sh serving --first-chunk-frames 0 12 \
        --tag inproc-coalesced > /dev/null 2>&1 ) &
    wait
    quiet $W/bench-serving.log | grep -A7 "mode  conc"; grep -h "round\|best\|rc " $W/engines-fp8.log
    tail -2 $W/pytest-serve.log ;;
  ray)
    RAY_TIMEOUT=420 OUT=$W bash scripts/gpu-check.sh ray | tail -8 ;;
  *) echo "usage: $0 build|check|scale|extra|ray"; exit 2 ;;
esac
find benchmarks/results -maxdepth 1 -newer "$stamp" \( -name '*.json' -o -name '*.png' \) -exec cp -f {} $W/ \;
rm -f "$stamp"
[ "${1:-}" != build ] && tar czf "$OUT/${1}.tgz" -C "$W" . && rm -rf "$W"
exit 0
