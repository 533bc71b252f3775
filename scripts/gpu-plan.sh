#!/usr/bin/env bash
# One GPU verification round on a 2-GPU machine, in calls that fit the device limits (10 min a call,
# 8 files back): every stage runs its jobs on both cards at once, each card's jobs pinned to half of
# the host's cores (host-bound engines must not share cores with the other card's compiles), logs to
# $OUT, and packs them into one $OUT/<stage>.tgz (results JSON and plots included). Prints a short
# summary last.
#
#   (after .gpu-bundle/device-setup.sh, see ../shared/gpu/README.md)
#   bash scripts/gpu-plan.sh build      # csrc extension, frame-sink check                  (~1 min)
#   bash scripts/gpu-plan.sh check      # card 0: throughput + stock (same run), then the     (~9 min)
#                                       #         host profile of stock
#                                       # card 1: host profile of ChatTTS, then serving TTFA
#                                       #         (coalesced audio, with its stage breakdown and
#                                       #         every server process's stack sample)
#   bash scripts/gpu-plan.sh scale      # card 0: several engines per GPU (2, 3), bf16 KV   (~9 min)
#                                       # card 1: serving TTFA with the audio's CUDA graphs on
#                                       #         (coalesced batches padded to powers of two)
#   bash scripts/gpu-plan.sh extra      # card 0: decoder bench, then the GPU server test   (~9 min)
#                                       # card 1: serving TTFA, engine core in the server process
#   bash scripts/gpu-plan.sh ray        # both cards: Ray Serve 1 -> 2 replicas               (~5 min)
#   bash scripts/gpu-plan.sh confirm    # card 0: bf16 stream == one-shot, the GPU server     (~8 min)
#                                       #         test, kernel tests, MRv2 parity
#                                       # card 1: serving TTFA (F = 0, 6, 12), client lag too
#   bash scripts/gpu-plan.sh profile    # card 0 alone: host profiles, ChatTTS and stock     (~7 min)
#   bash scripts/gpu-plan.sh diagnose   # host profiles of both engines side by side (cProfile too),
#                                       # then GPU tests (card 0) and serving TTFA (card 1) (~8 min)
#   bash scripts/gpu-plan.sh variants   # ChatTTS step variants (export off, no read-back, GIL
#                                       #   switch 1 / 20 ms) on card 0, stock on card 1      (~5 min)
#   bash scripts/gpu-plan.sh final      # card 0 alone: throughput + stock; then card 0 serving
#                                       #   TTFA while card 1 runs the GPU tests and MRv2      (~9 min)
#   bash scripts/gpu-plan.sh engines [S]  # card 0 alone: $ENGINES (2) engines, batch 512 split (~2 min)
#   bash scripts/gpu-plan.sh ttfa       # card 0 alone: TTFA, lockstep and staggered arrivals,
#                                       #   then both with vLLM's --stream-interval 5         (~10 min)
#   bash scripts/gpu-plan.sh mps        # card 0 alone: 2 and 3 engines under MPS, bf16 / fp8 KV (~9 min)
#   bash scripts/gpu-plan.sh fronts     # one card: TTFA with 1, then 4 API server processes (~8 min)
#   bash scripts/gpu-plan.sh fronts-mps # one card: TTFA, 4 API servers under MPS, then without (~8 min)
#   bash scripts/gpu-plan.sh mpsfront N S # one card: TTFA, N API servers under MPS, S s limit   (~5 min)
#   bash scripts/gpu-plan.sh thru1      # one card: throughput + stock, batch 1 and 512        (~9 min)
#   bash scripts/gpu-plan.sh mpsengines [S] # one card: $ENGINES (2 3) engines under MPS       (~4-9 min)
#                                       #   (BENCH_EXTRA="--decode after" skips the overlap rounds)
#   bash scripts/gpu-plan.sh pinning    # one card: 2 and 3 engines under MPS, decode after, each  (~8 min)
#                                       #   engine on its own cores, then not (same call)
#   bash scripts/gpu-plan.sh cores [S1 S2] # one card: 2 engines under MPS, batch 512 / 1024,   (~9 min)
#                                       #   each round twice, engine core in-process then in its own
#   bash scripts/gpu-plan.sh best [S]   # one card: 3 engines, MPS, pinned cores, batch 1024, (~6 min)
#                                       #   4 rounds (the 1,500 e2e configuration)
#   bash scripts/gpu-plan.sh warm       # pinned-decode GPU test, then a tiny engine run (JIT) (~3 min)
#   bash scripts/gpu-plan.sh tests1     # one card: GPU tests of the newest serving / sink code  (~6 min)
#   bash scripts/gpu-plan.sh thrucores  # one card: ChatTTS vs stock, batch 512, core in-process then own (~8 min)
#   bash scripts/gpu-plan.sh bursts N S # one card: TTFA, N API servers under MPS, 1 and 8 client processes (~4 min)
#   bash scripts/gpu-plan.sh burststacks N S # one card: bursts only, every server process's stacks sampled (~4 min)
#   bash scripts/gpu-plan.sh bursttl N S # one card: bursts only, the server's timeline and its report (~4 min)
#   bash scripts/gpu-plan.sh bursttlab N S1 S2 # one card: bursttl with vLLM's graph sizes, then ChatTTS's (~6 min)
#   bash scripts/gpu-plan.sh burstgraphs N S # one card: bursttl with audio CUDA graphs captured at start-up (~5 min)
#   bash scripts/gpu-plan.sh profileaudio # one card: ChatTTS step time without and with the audio models in its process, stock (~6 min)
#   bash scripts/gpu-plan.sh profileq   # one card: per-step host time, ChatTTS (with/without export) and stock (~5 min)
#   bash scripts/gpu-plan.sh measure    # card 0: throughput + stock, then the ChatTTS host   (~9 min)
#                                       #         profile (per step vs per batch)
#                                       # card 1: serving TTFA with the audio's CUDA graphs
#                                       #         (F = 0, 6, 12), then the decoder bench with
#                                       #         compile reduce-overhead and a batch-128 profile
#   bash scripts/gpu-plan.sh verify     # card 0: GPU tests (kernels, audio, runners), MRv2   (~9 min)
#                                       #         parity, the decoder bench (batch-128 profile)
#                                       # card 1: serving TTFA, no audio graphs, with the GIL
#                                       #         switch interval at 1 ms, then at 5 ms
set -u
cd "$(dirname "$0")/.."
ROOT=${OUT:-/tmp/gpu-out}; mkdir -p "$ROOT/w"
W=$ROOT/w
export PYTHONPATH=/root/site312:$PWD PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 OUT=$W
[ -f .gpu-bundle/extras-py.tar.xz ] && [ -d /root/site312 ] && tar xJf .gpu-bundle/extras-py.tar.xz -C /root/site312
stamp=$(mktemp)
# Triton autotune picks (kernels/tune_cache.py) travel between fresh machines: a stage returns
# them as tune-cache/*.json in its tgz; put that folder at .gpu-bundle/tune-cache and carry it.
mkdir -p ~/.cache/chattts_vllm
[ -d .gpu-bundle/tune-cache ] && cp -n .gpu-bundle/tune-cache/*.json ~/.cache/chattts_vllm/ 2>/dev/null
py=python3
half=$(( $(nproc) / 2 ))
# One card (nvidia-h200): its jobs get every core.
[ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" = 1 ] && half=$(nproc)
pin() { if command -v taskset > /dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
card0() { CUDA_VISIBLE_DEVICES=0 pin 0-$((half - 1)) "$@"; }
card1() { CUDA_VISIBLE_DEVICES=1 pin $half-$((2 * half - 1)) "$@"; }
# Whatever still holds a GPU (a job killed by `timeout` can leave its server, in a session of its
# own, holding memory: 2026-11-28 lost a call to that) is killed before each job.
gpu_free() {
  nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
  pkill -9 -f "vllm.entrypoints|chattts-vllm serve" 2>/dev/null; sleep 2; true
}
gpu_free
quiet() { grep -v "INFO\|it/s\]\|req/s\]\|req\]" "$@"; }
# TTFA at 1 and 64 streams, F = 6, lockstep and staggered arrivals, 3 rounds, on card 0:
# ttfa_run TAG LIMIT_S (SERVE_EXTRA / SERVE_MPS from the caller's environment); log bench-serving-TAG.log.
ttfa_run() {
  SERVING_TIMEOUT=$2 OUT=$W card0 bash scripts/gpu-check.sh serving --first-chunk-frames 6 \
      --arrivals lockstep staggered --rounds 3 --tag "$1" > /dev/null 2>&1
  mv $W/bench-serving.log "$W/bench-serving-$1.log"; gpu_free
}
serving_table() { for f in $W/bench-serving*.log; do quiet "$f" | grep -A7 "mode  conc"; done; }
# Bursts of 64 arrivals (8 client processes, 3 rounds), N API processes under MPS, the server's
# timeline in $W/timeline-NAME: tl_run NAME N LIMIT_S (TL_EXTRA: more serve flags; other settings
# from the caller's environment); tl_report NAME prints the level and the timeline report, and
# packs the timeline.
tl_run() {
  CHATTTS_VLLM_TIMELINE=$W/timeline-$1 SERVE_MPS=1 SERVE_EXTRA="--api-server-count $2 ${TL_EXTRA:-}" \
      SERVING_TIMEOUT=$3 OUT=$W card0 bash scripts/gpu-check.sh serving --first-chunk-frames 6 \
      --arrivals lockstep --rounds 3 --concurrency 64 --client-procs 8 --tag "asc$2-mps-$1" > /dev/null 2>&1
  mv $W/bench-serving.log "$W/bench-serving-$1.log"; gpu_free
}
tl_report() {
  echo "== $1"; quiet $W/bench-serving-$1.log | grep -A2 "mode  conc"
  $py benchmarks/timeline_report.py $W/timeline-$1 --json $W/timeline-report-$1.json 2>&1 | head -16
  tar czf $W/timeline-$1.tgz -C $W timeline-$1 2>/dev/null; rm -rf $W/timeline-$1
}

case "${1:-}" in
  build)
    bash scripts/gpu-check.sh build 2>&1 | tail -4
    $py -c "import torch, chattts_vllm.ops; print('native frame sink:', hasattr(torch.classes.chattts_vllm, 'FrameSinkWorker'))"
    timeout 60 $py -m pytest -q tests/runners/test_frame_sink.py 2>&1 | tail -1
    timeout 60 $py scripts/diag_frame_sink.py 2>&1 | tail -6 ;;
  check)
    ( card0 timeout 400 $py benchmarks/bench_throughput.py --batches 1 512 --time-limit 390 \
        > $W/throughput.log 2>&1; echo "throughput rc $?" >> $W/throughput.log
      card0 timeout 150 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 --stock \
        > $W/profile-stock.log 2>&1 ) &
    ( card1 timeout 200 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 > $W/profile.log 2>&1
      CHATTTS_VLLM_STACK_SAMPLE=$W/stacks CHATTTS_VLLM_STACK_SAMPLE_MS=5 SERVING_TIMEOUT=330 OUT=$W \
        card1 bash scripts/gpu-check.sh serving --first-chunk-frames 0 12 --tag coalesced > /dev/null 2>&1
      cat $W/stacks.*.txt > $W/server-stacks.log 2>/dev/null; rm -f $W/stacks.*.txt ) &
    wait
    quiet $W/throughput.log | grep -A4 "^ batch"; tail -1 $W/throughput.log
    serving_table
    grep -h "^== \|^-- thread\|^   [a-z]" $W/profile*.log | head -60
    grep -h "^pid \|^-- thread MainThread\|^   [a-z]" $W/server-stacks.log 2>/dev/null | cut -c1-90 | head -40 ;;
  scale)
    ( card0 timeout 560 $py benchmarks/bench_throughput.py --engines 2 3 --batches 512 --skip-stock \
        --time-limit 550 > $W/engines.log 2>&1; echo "engines rc $?" >> $W/engines.log ) &
    ( CHATTTS_AUDIO_CUDA_GRAPHS=1 SERVING_TIMEOUT=400 OUT=$W card1 bash scripts/gpu-check.sh serving \
        --first-chunk-frames 0 12 --tag graphs > /dev/null 2>&1 ) &
    wait
    grep -h "round\|best\|rc " $W/engines*.log; serving_table ;;
  extra)
    ( card0 timeout 260 $py benchmarks/bench_decoder.py --impls eager compile triton triton-graph compile-reduce-overhead \
        > $W/decoder.log 2>&1; echo "decoder rc $?" >> $W/decoder.log
      card0 timeout 300 $py -m pytest -q -m gpu tests/gpu/test_serve_gpu.py > $W/pytest-serve.log 2>&1
      echo "pytest serve rc $?" >> $W/pytest-serve.log ) &
    ( card1 timeout 300 $py -m pytest -q -m gpu tests/kernels tests/audio tests/runners > $W/pytest-gpu.log 2>&1
      echo "pytest rc $?" >> $W/pytest-gpu.log
      MRV2_TIMEOUT=200 OUT=$W card1 bash scripts/gpu-check.sh mrv2 > /dev/null 2>&1 ) &
    wait
    quiet $W/decoder.log | grep -A10 "^impl "; tail -1 $W/decoder.log
    tail -2 $W/pytest-gpu.log; grep -E "passed|failed" $W/pytest-mrv2.log | tail -1; tail -2 $W/pytest-serve.log ;;
  measure)
    ( card0 timeout 400 $py benchmarks/bench_throughput.py --batches 1 512 --time-limit 390 \
        > $W/throughput.log 2>&1; echo "throughput rc $?" >> $W/throughput.log
      card0 timeout 140 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 \
        > $W/profile.log 2>&1 ) &
    ( CHATTTS_AUDIO_CUDA_GRAPHS=1 CHATTTS_VLLM_STACK_SAMPLE=$W/stacks CHATTTS_VLLM_STACK_SAMPLE_MS=5 \
        SERVING_TIMEOUT=330 OUT=$W card1 bash scripts/gpu-check.sh serving --first-chunk-frames 0 6 12 \
        --tag graphs > /dev/null 2>&1
      cat $W/stacks.*.txt > $W/server-stacks.log 2>/dev/null; rm -f $W/stacks.*.txt
      card1 timeout 200 $py benchmarks/bench_decoder.py --impls eager compile triton triton-graph \
        compile-reduce-overhead --profile --profile-batch 128 --profile-impls triton compile \
        > $W/decoder.log 2>&1; echo "decoder rc $?" >> $W/decoder.log ) &
    wait
    quiet $W/throughput.log | grep -A4 "^ batch"; tail -1 $W/throughput.log
    grep -h "^== " $W/profile.log
    serving_table
    quiet $W/decoder.log | grep -A12 "^impl "; tail -1 $W/decoder.log ;;
  verify)
    ( card0 timeout 200 $py -m pytest -q -m gpu tests/kernels tests/audio tests/runners > $W/pytest-gpu.log 2>&1
      echo "pytest rc $?" >> $W/pytest-gpu.log
      MRV2_TIMEOUT=120 OUT=$W card0 bash scripts/gpu-check.sh mrv2 > /dev/null 2>&1
      card0 timeout 200 $py benchmarks/bench_decoder.py --impls eager compile triton triton-graph \
        compile-reduce-overhead --profile --profile-batch 128 > $W/decoder.log 2>&1
      echo "decoder rc $?" >> $W/decoder.log ) &
    ( SERVING_TIMEOUT=250 OUT=$W card1 bash scripts/gpu-check.sh serving --first-chunk-frames 0 6 12 \
        --tag switch1ms > /dev/null 2>&1
      mv $W/bench-serving.log $W/bench-serving-switch1ms.log
      CHATTTS_VLLM_GIL_SWITCH_MS=5 SERVING_TIMEOUT=220 OUT=$W card1 bash scripts/gpu-check.sh serving \
        --first-chunk-frames 6 12 --tag switch5ms > /dev/null 2>&1
      mv $W/bench-serving.log $W/bench-serving-switch5ms.log ) &
    wait
    tail -2 $W/pytest-gpu.log; grep -E "passed|failed" $W/pytest-mrv2.log | tail -1
    quiet $W/decoder.log | grep -A12 "^impl "; tail -1 $W/decoder.log
    serving_table ;;
  confirm)
    ( card0 timeout 300 $py -m pytest -q -m gpu tests/audio/test_audio_stream.py tests/gpu/test_serve_gpu.py \
        tests/kernels > $W/pytest-confirm.log 2>&1; echo "pytest rc $?" >> $W/pytest-confirm.log
      MRV2_TIMEOUT=150 OUT=$W card0 bash scripts/gpu-check.sh mrv2 > /dev/null 2>&1 ) &
    ( SERVING_TIMEOUT=420 OUT=$W card1 bash scripts/gpu-check.sh serving --first-chunk-frames 0 6 12 \
        --tag confirm > /dev/null 2>&1 ) &
    wait
    tail -2 $W/pytest-confirm.log; grep -E "passed|failed" $W/pytest-mrv2.log | tail -1; serving_table ;;
  diagnose)
    # Both engines' host profiles at the same time (one per card, so each sees the same neighbour),
    # with cProfile's exact call counts; then the GPU tests (card 0) and serving TTFA (card 1).
    command -v nvidia-cuda-mps-control > /dev/null && echo "MPS control: yes" || echo "MPS control: no"
    ( card0 timeout 240 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 --cprofile > $W/profile.log 2>&1
      card0 timeout 240 $py -m pytest -q -m gpu tests/audio/test_audio_stream.py tests/gpu/test_serve_gpu.py \
        tests/kernels > $W/pytest-confirm.log 2>&1; echo "pytest rc $?" >> $W/pytest-confirm.log
      MRV2_TIMEOUT=100 OUT=$W card0 bash scripts/gpu-check.sh mrv2 > /dev/null 2>&1 ) &
    ( card1 timeout 240 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 --stock --cprofile \
        > $W/profile-stock.log 2>&1
      SERVING_TIMEOUT=300 OUT=$W card1 bash scripts/gpu-check.sh serving --first-chunk-frames 6 12 \
        --tag diagnose > /dev/null 2>&1 ) &
    wait
    tail -2 $W/pytest-confirm.log; grep -E "passed|failed" $W/pytest-mrv2.log | tail -1; serving_table
    grep -h "^== " $W/profile*.log ;;
  variants)
    # Which part of the ChatTTS step costs host time: the same batch with the record export off,
    # without reading frames back, at other GIL switch intervals; stock at the same time.
    ( card0 timeout 280 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 --quick \
        --variants raw noexport raw-switch1 raw-switch20 > $W/variants.log 2>&1
      card0 timeout 150 $py benchmarks/profile_gpt_step.py --batch 1 --frames 300 --quick \
        --variants raw noexport > $W/variants-b1.log 2>&1 ) &
    ( card1 timeout 200 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 --quick --stock \
        > $W/variants-stock.log 2>&1
      card1 timeout 150 $py benchmarks/profile_gpt_step.py --batch 1 --frames 300 --quick --stock \
        > $W/variants-stock-b1.log 2>&1 ) &
    wait
    grep -h "^== \|Error" $W/variants*.log ;;
  final)
    # Throughput with stock in the same run on card 0 while card 1 idles (a busy neighbour skewed
    # 2026-11-28's stock figure by 25 %), then serving TTFA on card 0 with the GPU tests on card 1.
    card0 timeout 300 $py benchmarks/bench_throughput.py --batches 1 512 --time-limit 290 \
        > $W/throughput.log 2>&1; echo "throughput rc $?" >> $W/throughput.log
    ( card1 timeout 200 $py -m pytest -q -m gpu tests/runners tests/kernels/test_frame_glue_gpu.py \
        tests/audio/test_audio_stream.py > $W/pytest-gpu.log 2>&1; echo "pytest rc $?" >> $W/pytest-gpu.log
      MRV2_TIMEOUT=150 OUT=$W card1 bash scripts/gpu-check.sh mrv2 > /dev/null 2>&1 ) &
    ( SERVING_TIMEOUT=230 OUT=$W card0 bash scripts/gpu-check.sh serving --first-chunk-frames 6 \
        --tag final > /dev/null 2>&1 ) &
    wait
    tail -2 $W/pytest-gpu.log; grep -E "passed|failed" $W/pytest-mrv2.log | tail -1
    quiet $W/throughput.log | grep -A4 "^ batch"; tail -1 $W/throughput.log
    serving_table ;;
  engines)
    # Card 0 alone: several engines without MPS (ENGINES, default 2), S s limit (default 390);
    # BENCH_EXTRA="--profile-decode" puts each engine's decode under torch.profiler.
    card0 timeout $((${2:-390} + 10)) $py benchmarks/bench_throughput.py --engines ${ENGINES:-2} \
        --batches 512 --skip-stock --time-limit ${2:-390} ${BENCH_EXTRA:-} > $W/engines.log 2>&1
    echo "engines rc $?" >> $W/engines.log
    grep -h "round\|best\|rc \|stopped" $W/engines*.log ;;
  ttfa)
    # Card 0 alone: TTFA at 1 and 64 streams, F = 6, lockstep arrivals (each round a burst of 64)
    # and staggered ones (the steady state of 64 streams); then the same with vLLM's
    # --stream-interval 5: the API process hands each stream an output every 5 frames, not every
    # frame (64 streams at ~4 ms a step: ~17,000 outputs and wake-ups a second, a fifth left).
    ttfa_run arrivals 290
    SERVE_EXTRA="--stream-interval 5" ttfa_run interval5 290
    serving_table ;;
  mps)
    # Card 0 alone: 2 and 3 engines under MPS (kernels of the engine processes run side by side
    # instead of time-sliced), bf16 then fp8 KV cache (attention is ~70 % of a step's GPU time).
    card0 timeout 280 $py benchmarks/bench_throughput.py --engines 2 3 --batches 512 --skip-stock --mps \
        --time-limit 270 --tag mps > $W/engines-mps.log 2>&1; echo "mps rc $?" >> $W/engines-mps.log
    card0 timeout 280 $py benchmarks/bench_throughput.py --engines 2 3 --batches 512 --skip-stock --mps \
        --kv-cache-dtype fp8 --time-limit 270 --tag mps-fp8 > $W/engines-mps-fp8.log 2>&1
    echo "mps fp8 rc $?" >> $W/engines-mps-fp8.log
    grep -h "round\|best\|rc \|MPS" $W/engines-mps*.log ;;
  fronts)
    # One card: TTFA at 1 and 64 streams, F = 6, lockstep and staggered arrivals, with one API
    # server process, then with four (vLLM's --api-server-count: each process has its own event
    # loop, audio models and decode pool, so the per-frame Python work of 64 streams is split).
    ttfa_run asc1 260
    SERVE_EXTRA="--api-server-count 4" ttfa_run asc4 230
    serving_table ;;
  fronts-mps)
    # One card: 4 API servers, with and without MPS (the audio decode of 16 streams per process
    # was ~100 ms of the first audio with 5 CUDA contexts time-sliced, 2026-11-28).
    SERVE_MPS=1 SERVE_EXTRA="--api-server-count 4" ttfa_run asc4-mps 260
    SERVE_EXTRA="--api-server-count 4" ttfa_run asc4 230
    serving_table ;;
  mpsfront)
    # One card: TTFA with N API server processes under MPS (bash scripts/gpu-plan.sh mpsfront N
    # LIMIT_S); the first start on a fresh machine compiles for minutes, so give it the limit.
    SERVE_MPS=1 SERVE_EXTRA="--api-server-count ${2:-4}" ttfa_run "asc${2:-4}-mps" "${3:-260}"
    serving_table ;;
  thru1)
    # One card: stock and ChatTTS at batch 1 and 512, same run. A fresh machine's first engine
    # start (torch.compile, FlashInfer JIT, graph capture) took over 180 s on 2026-11-28.
    card0 timeout 560 $py benchmarks/bench_throughput.py --batches 1 512 --time-limit 550 \
        > $W/throughput.log 2>&1; echo "throughput rc $?" >> $W/throughput.log
    quiet $W/throughput.log | grep -A3 "^ batch"; grep "failed\|stopped" $W/throughput.log; tail -1 $W/throughput.log ;;
  mpsengines)
    # One card: 2 and 3 ChatTTS engines under MPS (kernels of the engine processes side by side,
    # not time-sliced); the engines start one after the other (~60 s each on a warm machine).
    # ENGINES (default "2 3") and the limit S (default 550 s) from the caller.
    card0 timeout $((${2:-550} + 10)) $py benchmarks/bench_throughput.py --engines ${ENGINES:-2 3} \
        --batches 512 --skip-stock --mps --time-limit ${2:-550} ${BENCH_EXTRA:-} > $W/engines-mps.log 2>&1
    echo "mps rc $?" >> $W/engines-mps.log
    grep -h "round\|best\|rc \|MPS\|stopped" $W/engines-mps.log ;;
  pinning)
    # One card: the 2-engine GPT times of 2026-11-29 were up to 40 % apart within a round and
    # 1,166-1,575 across calls; each engine on its own slice of the cores, then floating.
    for pin in --pin-cores ""; do
      tag=$([ -n "$pin" ] && echo pinned || echo floating)
      card0 timeout $((${2:-270} + 10)) $py benchmarks/bench_throughput.py --engines ${ENGINES:-2 3} \
          --batches ${BATCHES:-512} --repeats ${REPEATS:-1} --skip-stock --mps --decode after $pin \
          --time-limit ${2:-270} --tag "mps-$tag" > "$W/engines-pin-$tag.log" 2>&1
      echo "rc $?" >> "$W/engines-pin-$tag.log"; gpu_free
    done
    grep -h "round\|rc \|stopped" $W/engines-pin*.log; grep -h -A6 "gpt med" $W/engines-pin*.log ;;
  cores)
    # One card: 2 engines under MPS, batch 512 and 1024 split, every round twice, with the engine
    # core in each engine's process (every throughput row until 2026-11-29, decode after the GPT),
    # then in its own process (vLLM's default; the in-process overlap lost to the GIL, so the own
    # set measures both decodes). S1 / S2 s limits; ENGINES, BATCHES, REPEATS from the caller.
    for core in inproc own; do
      lim=$([ $core = inproc ] && echo ${2:-250} || echo ${3:-320})
      dec=$([ $core = inproc ] && echo after || echo both)
      card0 timeout $((lim + 10)) $py benchmarks/bench_throughput.py --engines ${ENGINES:-2} \
          --batches ${BATCHES:-512 1024} --skip-stock --mps --decode $dec --core $core \
          --repeats ${REPEATS:-2} --time-limit $lim --tag "mps-$core" ${BENCH_EXTRA:-} > $W/engines-$core.log 2>&1
      echo "rc $?" >> $W/engines-$core.log; gpu_free
    done
    for core in inproc own; do echo "== core $core"; grep -h "round\|rc \|stopped" $W/engines-$core.log
      grep -A8 "gpt med" $W/engines-$core.log; done ;;
  best)
    # One card: the configuration that met 1,500 e2e on the H200 (2026-11-29): 3 engines under MPS,
    # each on its own slice of the cores, batch 1024 split, decode after, 4 rounds (median in the
    # summary). S s limit (default 330).
    card0 timeout $((${2:-330} + 10)) $py benchmarks/bench_throughput.py --engines ${ENGINES:-3} \
        --batches ${BATCHES:-1024} --repeats ${REPEATS:-4} --skip-stock --mps --pin-cores --decode after \
        --time-limit ${2:-330} --tag mps-best > $W/engines-best.log 2>&1; echo "rc $?" >> $W/engines-best.log
    grep -h "round\|rc \|stopped" $W/engines-best.log; grep -h -A4 "gpt med" $W/engines-best.log ;;
  warm)
    # The pinned decode's parity on the GPU, then one tiny engine run: the first engine start on a
    # fresh machine (FlashInfer JIT, torch.compile) must not eat a measuring call's limit.
    timeout 150 $py -m pytest -q -m gpu tests/audio/test_audio_coalesce.py -k pipelined 2>&1 | tail -1
    card0 timeout 300 $py benchmarks/bench_throughput.py --engines 1 --batches 8 --frames 48 --skip-stock \
        --decode after --time-limit 290 --tag warm > $W/warm.log 2>&1; echo "warm rc $?"
    grep -h "round\|stopped" $W/warm.log ;;
  tests1)
    # One card: what changed since the last GPU tests (native sink failure path, early submit,
    # delta outputs, decode_utterances), then MRv2 parity.
    card0 timeout 290 $py -m pytest -q -m gpu tests/runners tests/kernels/test_frame_glue_gpu.py \
        tests/audio/test_audio_stream.py tests/gpu/test_serve_gpu.py > $W/pytest-gpu.log 2>&1
    echo "pytest rc $?" >> $W/pytest-gpu.log; gpu_free
    MRV2_TIMEOUT=150 OUT=$W card0 bash scripts/gpu-check.sh mrv2 > /dev/null 2>&1
    tail -3 $W/pytest-gpu.log; grep -E "passed|failed" $W/pytest-mrv2.log | tail -1 ;;
  profile)
    # Host profiles with the other card idle (a busy neighbour inflated 2026-11-28's per-step figure).
    card0 timeout 250 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 > $W/profile.log 2>&1
    card0 timeout 200 $py benchmarks/profile_gpt_step.py --batch 512 --frames 150 --stock > $W/profile-stock.log 2>&1
    grep -h "^== \|^-- thread\|^   [a-z]" $W/profile*.log | head -60 ;;
  bursts)
    # One card: TTFA at 64 streams (F = 6, bursts and staggered), N API processes under MPS (own
    # listening sockets since 1d23a7c), the clients in 1 and in 8 client processes; S s limit.
    SERVE_MPS=1 SERVE_EXTRA="--api-server-count ${2:-8}" SERVING_TIMEOUT=${3:-300} OUT=$W card0 \
        bash scripts/gpu-check.sh serving --first-chunk-frames 6 --arrivals lockstep staggered \
        --rounds 3 --client-procs 1 8 --tag "asc${2:-8}-mps-procs" > /dev/null 2>&1
    mv $W/bench-serving.log "$W/bench-serving-procs.log"; gpu_free
    quiet $W/bench-serving-procs.log | grep -A14 "mode  conc" ;;
  burststacks)
    # One card: bursts only (64 simultaneous arrivals, 8 client processes), N API processes under
    # MPS, every server process's Python stacks sampled every 2 ms: where the engine core and the
    # API processes spend a burst's host time (engine TTFT 95 ms against 22 ms staggered).
    CHATTTS_VLLM_STACK_SAMPLE=$W/stacks CHATTTS_VLLM_STACK_SAMPLE_MS=2 SERVE_MPS=1 \
        SERVE_EXTRA="--api-server-count ${2:-8}" SERVING_TIMEOUT=${3:-240} OUT=$W card0 \
        bash scripts/gpu-check.sh serving --first-chunk-frames 6 --arrivals lockstep --rounds 5 \
        --client-procs 8 --tag "asc${2:-8}-mps-stacks" > /dev/null 2>&1
    mv $W/bench-serving.log "$W/bench-serving-stacks.log"; gpu_free
    cat $W/stacks.*.txt > $W/server-stacks.log 2>/dev/null; rm -f $W/stacks.*.txt
    quiet $W/bench-serving-stacks.log | grep -A6 "mode  conc"
    grep -h "^pid \|^-- thread\|^   [a-z]" $W/server-stacks.log | cut -c1-100 | head -70 ;;
  bursttl)
    # One card: bursts only (8 client processes), N API processes under MPS, with the server's
    # timeline on (chattts_vllm/timeline.py): each request's first audio split by stage across
    # the processes, and the engine's steps through the median burst (timeline_report.py).
    CHATTTS_VLLM_TIMELINE=$W/timeline SERVE_MPS=1 SERVE_EXTRA="--api-server-count ${2:-8}" \
        SERVING_TIMEOUT=${3:-240} OUT=$W card0 bash scripts/gpu-check.sh serving --first-chunk-frames 6 \
        --arrivals lockstep --rounds 4 --client-procs 8 --tag "asc${2:-8}-mps-timeline" > /dev/null 2>&1
    mv $W/bench-serving.log "$W/bench-serving-timeline.log"; gpu_free
    quiet $W/bench-serving-timeline.log | grep -A6 "mode  conc"
    $py benchmarks/timeline_report.py $W/timeline --json $W/timeline-report.json 2>&1 | tail -60
    tar czf $W/timeline.tgz -C $W timeline && rm -rf $W/timeline ;;
  bursttlab)
    # One card: bursts of 64 (8 client processes) with the server's timeline, N API processes
    # under MPS; first with vLLM's default graph sizes (up to 256 tokens, so a burst's prefill
    # steps ran eagerly), then with ChatTTS's default (up to 2,048: piecewise graphs for them).
    # S1 / S2 s limits; CONFIGS="base" or "graphs" runs one (a fresh machine's first server start
    # took 151 s on 2026-11-29, so both plus the setup did not fit one call).
    for cfg in ${CONFIGS:-base graphs}; do
      if [ $cfg = base ]; then
        TL_EXTRA="--compilation-config '{\"max_cudagraph_capture_size\":256}'" tl_run tl-$cfg ${2:-8} ${3:-200}
      else
        tl_run tl-$cfg ${2:-8} ${4:-170}
      fi
    done
    for cfg in ${CONFIGS:-base graphs}; do tl_report tl-$cfg; done ;;
  burstgraphs)
    # One card: bursts with the audio's CUDA graphs (CHATTTS_AUDIO_CUDA_GRAPHS=1): every stream
    # shape captured at each padded batch size at start-up, then frozen (no capture while
    # serving); the first chunk's decode was 33 ms p50 of a 152 ms burst TTFA. S s limit.
    CHATTTS_AUDIO_CUDA_GRAPHS=1 tl_run agraphs ${2:-8} ${3:-250}
    grep -h "audio CUDA graphs captured" $W/serving-*-agraphs-server.log | head -2
    tl_report agraphs ;;
  thrucores)
    # One card: ChatTTS against stock at batch 512 (GPT, then decode after it), both with the engine
    # core in-process (every throughput row until 2026-11-29), then both with it in its own process
    # (vLLM's default), same call. S s limit per run (default 280); CORES (default "inproc own") and
    # REPEATS (each rate the median of that many rounds, stock's too) from the caller.
    for core in ${CORES:-inproc own}; do
      card0 timeout $((${2:-280} + 10)) $py benchmarks/bench_throughput.py --batches 512 --decode after \
          --core $core --repeats ${REPEATS:-1} --time-limit ${2:-280} --tag "core-$core" > $W/thru-$core.log 2>&1
      echo "rc $?" >> $W/thru-$core.log; gpu_free
    done
    for core in ${CORES:-inproc own}; do echo "== core $core"; quiet $W/thru-$core.log | grep -A2 "^ batch"
      grep -h "failed\|stopped\|rc " $W/thru-$core.log; done ;;
  profileq)
    # One card: per-step and per-batch host time of ChatTTS (plain, and without the record export)
    # and of stock at batch 512, 300 frames (profile_gpt_step.py --quick: two lengths, no profilers).
    card0 timeout 220 $py benchmarks/profile_gpt_step.py --quick --batch 512 --frames 300 \
        --variants raw noexport > $W/profile-q.log 2>&1; gpu_free
    card0 timeout 150 $py benchmarks/profile_gpt_step.py --quick --stock --batch 512 --frames 300 \
        > $W/profile-q-stock.log 2>&1
    grep -h "^== " $W/profile-q*.log ;;
  profileaudio)
    # One card: ChatTTS's per-step host time at batch 512 x 300 frames, plain, then with the audio
    # models loaded and the decoder warmed in the same process (as the throughput benchmark's
    # engine process has them), then stock; the same call.
    for extra in "" --with-audio; do
      card0 timeout 200 $py benchmarks/profile_gpt_step.py --quick --batch 512 --frames 300 $extra \
          > "$W/profile-q$extra.log" 2>&1; gpu_free
    done
    card0 timeout 150 $py benchmarks/profile_gpt_step.py --quick --stock --batch 512 --frames 300 \
        > $W/profile-q-stock.log 2>&1
    grep -h "^== " $W/profile-q*.log ;;
  ray)
    RAY_TIMEOUT=420 OUT=$W bash scripts/gpu-check.sh ray | tail -8 ;;
  *) echo "usage: $0 build|check|scale|extra|ray|measure|verify|confirm|diagnose|variants|final|engines|ttfa|mps|profile|fronts|fronts-mps|mpsfront|thru1|mpsengines|pinning|cores|best|warm|tests1|thrucores|profileq|bursts|burststacks|bursttl|bursttlab|burstgraphs|profileaudio"; exit 2 ;;
esac
find benchmarks/results -maxdepth 1 -newer "$stamp" \( -name '*.json' -o -name '*.png' \) -exec cp -f {} $W/ \;
rm -f "$stamp"
mkdir -p $W/tune-cache && cp ~/.cache/chattts_vllm/*.json $W/tune-cache/ 2>/dev/null
[ "${1:-}" != build ] && tar czf "$ROOT/${1}.tgz" -C "$W" . && rm -rf "$W"
exit 0
