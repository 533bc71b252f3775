// FrameSinkWorker: writes each engine step's side-channel records into the requests' memory maps
// on a native thread, so the per-step sink path runs no Python and never takes the GIL.
//
// The model runner V2 sampler (chattts_vllm/runners/mrv2.py) packs one record per row into a
// pinned int32 buffer, row i = [marker, 4 codes, hidden state], marker = frame index + 1 (0 = no
// record), and pushes it with each row's file base address (0 = no open file) and capacity in
// records. With `push_after_stream` the job joins the worker's queue when the CUDA stream reaches
// that point (cudaLaunchHostFunc: after the device-to-host copy of the records); `push` queues it
// now (host data). The worker copies row i to base[i] + (marker - 1) * record bytes, payload
// first, then the marker with release order, so a reader that sees the marker sees the payload.
// A row past its file's capacity is dropped and counted (the caller sizes files from max_tokens).
//
// Why native: a Python sink thread woke once a step and needed the GIL that the engine's scheduler
// thread holds; on the H100 host profile its hand-offs cost the engine ~1.8 ms a step at batch 512.
// Twin: `SinkTwin` in chattts_vllm/runners/outputs.py. Built alone (no CUDA) by the CPU tests.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef CHATTTS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace chattts_vllm {

// Rows of one step to their records; returns the number of rows dropped for capacity.
int64_t write_step(const int32_t* rec, int64_t n, int64_t words, const int64_t* base,
                   const int64_t* capacity) {
  int64_t dropped = 0;
  const int64_t bytes = words * static_cast<int64_t>(sizeof(int32_t));
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* src = rec + i * words;
    const int64_t marker = src[0];
    if (marker <= 0 || base[i] == 0) continue;
    if (marker > capacity[i]) {
      ++dropped;
      continue;
    }
    auto* row = reinterpret_cast<int32_t*>(static_cast<uintptr_t>(base[i] + (marker - 1) * bytes));
    std::memcpy(row + 1, src + 1, static_cast<size_t>(words - 1) * sizeof(int32_t));
    __atomic_store_n(row, src[0], __ATOMIC_RELEASE);
  }
  return dropped;
}

// What the worker thread and the jobs on CUDA streams share. It lives as long as its last user:
// the Python-facing object, the thread (until it has drained the queue) or a job not yet taken.
struct SinkState;

struct SinkJob {
  std::shared_ptr<SinkState> state;
  at::Tensor records;
  std::vector<int64_t> base, capacity;
  int64_t seq;
};

struct SinkState {
  explicit SinkState(int64_t w) : words(w) {}
  const int64_t words;
  std::mutex mu;
  std::condition_variable cv, done_cv;
  std::deque<SinkJob*> jobs;
  int64_t on_streams = 0;  // jobs handed to cudaLaunchHostFunc, not yet queued
  bool stop = false;
  std::atomic<int64_t> submitted{0}, completed{0}, dropped{0};

  void enqueue(SinkJob* job, bool from_stream) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (from_stream) --on_streams;
      jobs.push_back(job);
    }
    cv.notify_one();
  }

  // The worker thread: until stopped with nothing queued and nothing left on a stream. It holds
  // its own reference, so the Python object can go at any time and nothing ever joins itself.
  static void run(std::shared_ptr<SinkState> s) {
    for (;;) {
      SinkJob* job;
      {
        std::unique_lock<std::mutex> lock(s->mu);
        s->cv.wait(lock, [&] { return !s->jobs.empty() || (s->stop && s->on_streams == 0); });
        if (s->jobs.empty()) return;
        job = s->jobs.front();
        s->jobs.pop_front();
      }
      s->dropped += write_step(job->records.data_ptr<int32_t>(), static_cast<int64_t>(job->base.size()),
                               s->words, job->base.data(), job->capacity.data());
      const int64_t seq = job->seq;
      delete job;
      {
        std::lock_guard<std::mutex> lock(s->mu);
        s->completed.store(seq);
      }
      s->done_cv.notify_all();
    }
  }
};

class FrameSinkWorker : public torch::CustomClassHolder {
 public:
  explicit FrameSinkWorker(int64_t words) : state_(std::make_shared<SinkState>(words)) {
    std::thread(&SinkState::run, state_).detach();
  }

  // Stops the thread once every step pushed so far is written (it may outlive this object).
  ~FrameSinkWorker() override {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->stop = true;
    }
    state_->cv.notify_all();
  }

  // Queue a step now. records [>= n, words] int32 CPU; base, capacity [n] int64. Returns the
  // step's sequence number (>= 1) or a negative error code (kBad*, see below); it never throws:
  // on the H200 a C++ exception thrown out of this class's methods killed the process
  // (2026-11-28), so errors are values and chattts_vllm/runners/outputs.py raises them.
  int64_t push(const at::Tensor& records, const at::Tensor& base, const at::Tensor& capacity) {
    const int64_t bad = check(records, base, capacity);
    if (bad < 0) return bad;
    SinkJob* job = make_job(records, base, capacity);
    state_->enqueue(job, false);
    return job->seq;
  }

  // Queue a step when `stream` (a cudaStream_t as an integer) reaches this point.
  int64_t push_after_stream(const at::Tensor& records, const at::Tensor& base,
                            const at::Tensor& capacity, int64_t stream) {
#ifdef CHATTTS_WITH_CUDA
    const int64_t bad = check(records, base, capacity);
    if (bad < 0) return bad;
    SinkJob* job = make_job(records, base, capacity);
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      ++state_->on_streams;
    }
    cudaError_t err = cudaLaunchHostFunc(reinterpret_cast<cudaStream_t>(stream), &on_stream, job);
    if (err != cudaSuccess) {
      // The copy may not have landed: write nothing, but complete the step so no wait hangs.
      std::fprintf(stderr, "FrameSinkWorker: cudaLaunchHostFunc failed: %s\n", cudaGetErrorString(err));
      job->base.clear();
      job->capacity.clear();
      state_->enqueue(job, true);
      return kBadLaunch;
    }
    return job->seq;
#else
    (void)records, (void)base, (void)capacity, (void)stream;
    return kNoCuda;
#endif
  }

  int64_t submitted() { return state_->submitted.load(); }
  int64_t completed() { return state_->completed.load(); }
  int64_t dropped() { return state_->dropped.load(); }

  // Block until step `seq` is written or `timeout_s` passes (the torch binding releases the GIL
  // meanwhile); true if written.
  bool wait(int64_t seq, double timeout_s) {
    std::unique_lock<std::mutex> lock(state_->mu);
    return state_->done_cv.wait_for(lock, std::chrono::duration<double>(timeout_s),
                                    [&] { return state_->completed.load() >= seq; });
  }

 private:
  // Error codes of push / push_after_stream (mirrored in outputs.py's SINK_ERRORS).
  static constexpr int64_t kBadRecords = -1, kBadBase = -2, kBadLaunch = -3, kNoCuda = -4,
                           kBadWords = -5;

  int64_t check(const at::Tensor& records, const at::Tensor& base, const at::Tensor& capacity) {
    if (state_->words < 1) return kBadWords;
    if (!(records.device().is_cpu() && records.scalar_type() == at::kInt && records.dim() == 2 &&
          records.is_contiguous() && records.size(1) == state_->words))
      return kBadRecords;
    if (!(base.device().is_cpu() && base.scalar_type() == at::kLong && base.dim() == 1 &&
          base.is_contiguous() && base.sizes() == capacity.sizes() && capacity.device().is_cpu() &&
          capacity.scalar_type() == at::kLong && capacity.is_contiguous() &&
          base.size(0) <= records.size(0)))
      return kBadBase;
    return 0;
  }

  SinkJob* make_job(const at::Tensor& records, const at::Tensor& base, const at::Tensor& capacity) {
    const int64_t n = base.size(0);
    auto* job = new SinkJob{state_, records,
                            std::vector<int64_t>(base.data_ptr<int64_t>(), base.data_ptr<int64_t>() + n),
                            std::vector<int64_t>(capacity.data_ptr<int64_t>(),
                                                 capacity.data_ptr<int64_t>() + n),
                            0};
    job->seq = ++state_->submitted;
    return job;
  }

  static void on_stream(void* arg) {  // CUDA's callback thread: queue only, no CUDA calls
    auto* job = static_cast<SinkJob*>(arg);
    job->state->enqueue(job, true);
  }

  std::shared_ptr<SinkState> state_;
};

}  // namespace chattts_vllm

TORCH_LIBRARY_FRAGMENT(chattts_vllm, m) {
  m.class_<chattts_vllm::FrameSinkWorker>("FrameSinkWorker")
      .def(torch::init<int64_t>())
      .def("push", &chattts_vllm::FrameSinkWorker::push)
      .def("push_after_stream", &chattts_vllm::FrameSinkWorker::push_after_stream)
      .def("submitted", &chattts_vllm::FrameSinkWorker::submitted)
      .def("completed", &chattts_vllm::FrameSinkWorker::completed)
      .def("dropped", &chattts_vllm::FrameSinkWorker::dropped)
      .def("wait", &chattts_vllm::FrameSinkWorker::wait);
}
