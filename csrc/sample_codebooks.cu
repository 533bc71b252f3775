// Fused ChatTTS code-pass sampling step: one CTA per (request, codebook) row of 626 logits.
// Twin: chattts_vllm/gpt/sampling.py (process_logits + draw). The kernel reproduces the float
// operations the twin runs on CUDA (torch 2.11), so codes and processed logits match bit for bit:
//   x / temperature                         div.rn, as torch's div kernel
//   penalty: powf(penalty, count), x*a, x/a  torch.pow -> powf; mul.rn / div.rn
//   top-p: stable ascending sort             torch.sort (626 <= 4096) = cub::BlockRadixSort, stable,
//                                            -0.0 == +0.0; the same cub sorts here
//          softmax                           PersistentSoftmax.cuh softmax_warp_forward<.., 10>: lane l
//                                            sums exp(s[l + 32 i] - max) in i order, then a butterfly
//          cumsum                            ScanUtils.cuh tensor_kernel_scan_innermost_dim: Sklansky
//                                            tiles of 2 << L, L from the number of rows (4 B)
//   top-k, EOS mask, Gumbel-max              value comparisons; logf(logf) and argmax (NaN wins,
//                                            ties to the lower id), as torch.log / torch.argmax
// Every float op outside libdevice is an explicit round-to-nearest intrinsic, so no FMA contraction
// can change a result. This file must not be built with --use_fast_math (setup.py: see its flags).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_radix_sort.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>

#include "ops.h"

namespace chattts_vllm {
namespace {

constexpr int kVocab = 626;        // codes per codebook, EOS included
constexpr int kNumVq = 4;          // codebooks per frame
constexpr int kThreads = 128;
constexpr int kItems = 5;          // 128 x 5 = 640 sort slots >= 626
constexpr int kSlots = kThreads * kItems;
constexpr int kMinKeep = 3;        // top-p and top-k both keep >= 3
constexpr int kMaxWindow = 64;     // penalty window (ChatTTS: 16)
constexpr int kWarps = kThreads / 32;

static_assert(kSlots >= kVocab, "one CTA must hold a row");

struct Args {
  const void* logits;          // [B, 4, 626], last dim contiguous
  int64_t logits_sb, logits_sk;
  const void* history;         // dense [B, 4, W] or buffer [S, T, 4] (int32 / int64)
  int64_t hist_s0, hist_s1, hist_s2;
  const int64_t* slot;         // buffer mode only: [B] rows of the buffer
  const int64_t* first_frame;  // [B] buffer position of generated frame 0
  const int64_t* num_frames;   // [B] frames generated so far
  int window;
  const float* temperature;    // [B, 4]
  const float* top_p;          // [B]
  const int64_t* top_k;        // [B]
  const float* penalty;        // [B]
  const bool* mask_eos;        // [B]
  const int64_t* seed;         // [B]
  const int64_t* counter;      // [B] frame index: the noise counter
  int64_t* codes;              // [B, 4] out
  float* processed;            // [B, 4, 626] out, optional
  int eos_id;
  int scan_log_x;              // log2 of torch's cumsum threads_x for 4 B rows
};

// counter_uniform's 32-bit finaliser.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x5BD1E995u;
  return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t row_hash(int64_t seed, int64_t counter, int stream) {
  const uint64_t s = static_cast<uint64_t>(seed);
  uint32_t h = mix32(static_cast<uint32_t>(s));
  h = mix32(h ^ static_cast<uint32_t>(s >> 32));
  h = mix32(h ^ static_cast<uint32_t>(static_cast<uint64_t>(counter)));
  return mix32(h ^ static_cast<uint32_t>(stream) ^ 0x27D4EB2Fu);
}

// -log(-log(u)), u = ((bits >> 9) + 0.5) * 2^-23 in float32 exactly as the twin computes it; every
// such u is exact and inside (0, 1), so the noise is finite.
__device__ __forceinline__ float gumbel(uint32_t h, int token) {
  const uint32_t bits = mix32(h ^ mix32(static_cast<uint32_t>(token) + 0x165667B1u));
  const float u = __fmul_rn(__fadd_rn(__uint2float_rn(bits >> 9), 0.5f), 1.1920928955078125e-07f);
  return -logf(-logf(u));
}

// torch.argmax's order: NaN beats everything, equal values go to the lower index.
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  if (isnan(a)) return !isnan(b) || ia < ib;
  if (isnan(b)) return false;
  return a == b ? ia < ib : a > b;
}

template <typename hist_t>
__device__ __forceinline__ int window_id(const Args& a, int b, int k, int i, int& n) {
  if (a.slot == nullptr) {  // dense [B, 4, W], -1 = empty
    n = a.window;
    const auto* h = static_cast<const hist_t*>(a.history);
    return static_cast<int>(h[b * a.hist_s0 + k * a.hist_s1 + i * a.hist_s2]);
  }
  // buffer [S, T, 4]: the last min(j, W) frames before first_frame + j
  const int64_t j = a.num_frames[b];
  const int64_t len = j < a.window ? (j > 0 ? j : 0) : a.window;
  n = static_cast<int>(len);
  if (i >= len) return -1;
  const int64_t pos = a.first_frame[b] + j - len + i;
  const auto* h = static_cast<const hist_t*>(a.history);
  return static_cast<int>(h[a.slot[b] * a.hist_s0 + pos * a.hist_s1 + k * a.hist_s2]);
}

template <typename scalar_t, typename hist_t>
__global__ void __launch_bounds__(kThreads) sample_codebooks_kernel(const Args a) {
  using Sort = cub::BlockRadixSort<float, kThreads, kItems, int>;
  __shared__ union {
    typename Sort::TempStorage sort;
    float cum[kSlots];              // exp, then probabilities, then their cumsum (sorted order)
  } tmp;
  __shared__ float s_key[kSlots];   // sorted logits
  __shared__ int s_idx[kSlots];     // their ids (window counts before the sort)
  __shared__ int s_removed;
  __shared__ float s_best_v[kWarps];
  __shared__ int s_best_i[kWarps];

  const int row = blockIdx.x;
  const int b = row / kNumVq;
  const int k = row % kNumVq;
  const int tid = threadIdx.x;
  const int lane = tid & 31;

  // 1. penalty counts of the window ids (s_idx doubles as the count table)
  for (int i = tid; i < kSlots; i += kThreads) s_idx[i] = 0;
  if (tid == 0) s_removed = 0;
  __syncthreads();
  if (tid < a.window) {
    int n;
    const int id = window_id<hist_t>(a, b, k, tid, n);
    if (tid < n && id >= 0 && id < kVocab) atomicAdd(&s_idx[id], 1);
  }
  __syncthreads();

  // 2. temperature, penalty; blocked layout (thread t owns ids 5t .. 5t+4) keeps the sort stable by id
  const auto* lg = static_cast<const scalar_t*>(a.logits) + b * a.logits_sb + k * a.logits_sk;
  const float temperature = a.temperature[b * kNumVq + k];
  const float penalty = a.penalty[b];
  float keys[kItems];
  int ids[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int id = tid * kItems + i;
    ids[i] = id;
    if (id < kVocab) {
      float x = __fdiv_rn(static_cast<float>(lg[id]), temperature);
      const int count = s_idx[id];
      if (count > 0) {
        const float alpha = powf(penalty, static_cast<float>(count));
        x = x < 0.f ? __fmul_rn(x, alpha) : __fdiv_rn(x, alpha);
      }
      keys[i] = x;
    } else {
      keys[i] = __int_as_float(0x7FFFFFFF);  // sorts after every real logit
    }
  }
  __syncthreads();  // count table read before the sort output overwrites s_idx

  // 3. stable ascending sort (torch.sort's radix path)
  Sort(tmp.sort).Sort(keys, ids);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    s_key[tid * kItems + i] = keys[i];
    s_idx[tid * kItems + i] = ids[i];
  }
  __syncthreads();

  // 4. softmax of the sorted row in softmax_warp_forward's order
  float* cum = tmp.cum;
  const float row_max = s_key[kVocab - 1];
  for (int j = tid; j < kVocab; j += kThreads) cum[j] = expf(__fsub_rn(s_key[j], row_max));
  __syncthreads();
  float sum = 0.f;  // every warp reduces the same way; all get the same sum
#pragma unroll
  for (int it = 0; it < (kVocab + 31) / 32; ++it) {
    const int j = lane + 32 * it;
    if (j < kVocab) sum = __fadd_rn(sum, cum[j]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum = __fadd_rn(sum, __shfl_xor_sync(0xFFFFFFFFu, sum, off));
  __syncthreads();
  for (int j = tid; j < kVocab; j += kThreads) cum[j] = __fdiv_rn(cum[j], sum);
  __syncthreads();

  // 5. inclusive cumsum, bit-identical to torch's Sklansky tiles of C = 2 << L. A tile's first
  // element takes the carry (previous tile's last sum) before the tile's steps. Position p with top
  // bit h (tile-local) ends as  partial[2^h .. p] + out[2^h - 1]: the partials don't depend on the
  // carry (phase 1, all tiles at once), the spine out[2^h - 1] does (phase 2, one thread), the rest
  // adds one spine value each (phase 3).
  const int L = a.scan_log_x;
  const int tile = 2 << L;
  for (int m = 0; m <= L; ++m) {
    for (int p = tid; p < kVocab; p += kThreads) {
      const int local = p & (tile - 1);
      if (((local >> m) & 1) && (local >> (m + 1))) {
        cum[p] = __fadd_rn(cum[p], cum[(p & ~((2 << m) - 1)) + (1 << m) - 1]);
      }
    }
    __syncthreads();
  }
  if (tid == 0) {  // the only serial part: (626 / C) * (L + 2) dependent adds
    float carry = 0.f;
    for (int base = 0; base < kVocab; base += tile) {
      float part[10];  // partials at base + 2^(h+1) - 1, h = 0..L (L <= 9), loaded up front
#pragma unroll
      for (int h = 0; h < 10; ++h) {
        const int p = base + (2 << h) - 1;
        part[h] = h <= L && p < kVocab ? cum[p] : 0.f;
      }
      float v = __fadd_rn(cum[base], carry);
      cum[base] = v;
#pragma unroll
      for (int h = 0; h < 10; ++h) {
        const int p = base + (2 << h) - 1;
        if (h <= L && p < kVocab) {
          v = __fadd_rn(part[h], v);
          cum[p] = v;
        }
      }
      carry = v;  // out[base + C - 1] for every tile but the last
    }
  }
  __syncthreads();
  for (int p = tid; p < kVocab; p += kThreads) {
    const int local = p & (tile - 1);
    if (local != 0 && (local & (local + 1)) != 0) {
      const int h = 31 - __clz(local);
      cum[p] = __fadd_rn(cum[p], cum[p - local + (1 << h) - 1]);
    }
  }
  __syncthreads();

  // 6. top-p: the cumsum of non-negative terms is monotone, so "cum <= 1 - top_p" is a prefix
  const float threshold = __fsub_rn(1.f, a.top_p[b]);
  int removed = 0;
  for (int j = tid; j < kVocab; j += kThreads) removed += cum[j] <= threshold;
  if (removed) atomicAdd(&s_removed, removed);
  __syncthreads();
  const int first_kept = min(s_removed, kVocab - kMinKeep);

  // 7. top-k on what top-p kept: the k-th largest is s_key[V - k], or -inf if top-p removed it
  const int64_t top_k = a.top_k[b];
  const int keep_k = static_cast<int>(top_k < kMinKeep ? kMinKeep : (top_k > kVocab ? kVocab : top_k));
  const float kth = kVocab - keep_k >= first_kept ? s_key[kVocab - keep_k] : -INFINITY;

  // 8. EOS mask, Gumbel-max draw
  const bool mask_eos = a.mask_eos[b];
  const uint32_t h = row_hash(a.seed[b], a.counter[b], k);
  float best_v = -INFINITY;
  int best_i = INT_MAX;
  for (int j = tid; j < kVocab; j += kThreads) {
    const float x = s_key[j];
    const int id = s_idx[j];
    const bool keep = j >= first_kept && !(x < kth) && !(mask_eos && id == a.eos_id);
    const float proc = keep ? x : -INFINITY;
    if (a.processed != nullptr) a.processed[static_cast<int64_t>(row) * kVocab + id] = proc;
    const float v = __fadd_rn(proc, gumbel(h, id));
    if (better(v, id, best_v, best_i)) {
      best_v = v;
      best_i = id;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xFFFFFFFFu, best_v, off);
    const int oi = __shfl_xor_sync(0xFFFFFFFFu, best_i, off);
    if (better(ov, oi, best_v, best_i)) {
      best_v = ov;
      best_i = oi;
    }
  }
  if (lane == 0) {
    s_best_v[tid / 32] = best_v;
    s_best_i[tid / 32] = best_i;
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (better(s_best_v[w], s_best_i[w], best_v, best_i)) {
        best_v = s_best_v[w];
        best_i = s_best_i[w];
      }
    }
    a.codes[row] = best_i;
  }
}

// get_log_num_threads_x_inner_scan<uint32_t> (ATen/native/cuda/ScanUtils.cuh), unsigned wrap included.
uint32_t torch_scan_log_x(uint32_t num_rows, uint32_t row_size) {
  uint32_t lx = 0, ly = 0;
  while ((1u << lx) < row_size) ++lx;
  while ((1u << ly) < num_rows) ++ly;
  const uint32_t diff = lx - ly;
  lx = (9u + diff) / 2u;
  return std::min(std::max(4u, lx), 9u);
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype,
                  const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), name, " must be a contiguous [", n, "]");
}

}  // namespace

at::Tensor sample_codebooks_cuda(const at::Tensor& logits, const at::Tensor& history,
                                 const std::optional<at::Tensor>& slot,
                                 const std::optional<at::Tensor>& first_frame,
                                 const std::optional<at::Tensor>& num_frames, int64_t window,
                                 const at::Tensor& temperature, const at::Tensor& top_p,
                                 const at::Tensor& top_k, const at::Tensor& penalty,
                                 const at::Tensor& mask_eos, const at::Tensor& seed,
                                 const at::Tensor& counter, int64_t eos_id,
                                 const std::optional<at::Tensor>& processed) {
  TORCH_CHECK(logits.is_cuda(), "sample_codebooks: logits must be on CUDA");
  TORCH_CHECK(logits.dim() == 3 && logits.size(1) == kNumVq && logits.size(2) == kVocab,
              "sample_codebooks: logits must be [B, 4, 626], got ", logits.sizes());
  TORCH_CHECK(logits.stride(2) == 1, "sample_codebooks: logits' last dim must be contiguous");
  const at::Device device = logits.device();
  const int64_t B = logits.size(0);
  const auto hist_dtype = history.scalar_type();
  TORCH_CHECK(history.device() == device && history.dim() == 3 &&
                  (hist_dtype == at::kInt || hist_dtype == at::kLong),
              "sample_codebooks: history must be a 3-d int32/int64 tensor on ", device);
  TORCH_CHECK(window >= 0 && window <= kMaxWindow, "sample_codebooks: window must be in [0, 64]");
  TORCH_CHECK(eos_id >= 0 && eos_id < kVocab, "sample_codebooks: eos_id out of range");
  const bool buffer = slot.has_value();
  TORCH_CHECK(buffer == first_frame.has_value() && buffer == num_frames.has_value(),
              "sample_codebooks: slot, first_frame and num_frames go together");
  if (buffer) {
    TORCH_CHECK(history.size(2) == kNumVq, "sample_codebooks: code buffer must be [S, T, 4]");
    check_vector(*slot, "slot", B, at::kLong, device);
    check_vector(*first_frame, "first_frame", B, at::kLong, device);
    check_vector(*num_frames, "num_frames", B, at::kLong, device);
  } else {
    TORCH_CHECK(history.size(0) == B && history.size(1) == kNumVq && history.size(2) == window,
                "sample_codebooks: history must be [B, 4, window], got ", history.sizes());
  }
  TORCH_CHECK(temperature.device() == device && temperature.scalar_type() == at::kFloat &&
                  temperature.dim() == 2 && temperature.size(0) == B &&
                  temperature.size(1) == kNumVq && temperature.is_contiguous(),
              "sample_codebooks: temperature must be a contiguous float32 [B, 4]");
  check_vector(top_p, "top_p", B, at::kFloat, device);
  check_vector(top_k, "top_k", B, at::kLong, device);
  check_vector(penalty, "penalty", B, at::kFloat, device);
  check_vector(mask_eos, "mask_eos", B, at::kBool, device);
  check_vector(seed, "seed", B, at::kLong, device);
  check_vector(counter, "counter", B, at::kLong, device);
  if (processed.has_value()) {
    TORCH_CHECK(processed->device() == device && processed->scalar_type() == at::kFloat &&
                    processed->is_contiguous() && processed->dim() == 3 &&
                    processed->size(0) == B && processed->size(1) == kNumVq &&
                    processed->size(2) == kVocab,
                "sample_codebooks: processed must be a contiguous float32 [B, 4, 626]");
  }

  at::Tensor codes = at::empty({B, kNumVq}, logits.options().dtype(at::kLong));
  if (B == 0) return codes;
  TORCH_CHECK(B * kNumVq <= INT32_MAX, "sample_codebooks: batch too large");

  const c10::cuda::CUDAGuard guard(device);
  Args a{};
  a.logits = logits.data_ptr();
  a.logits_sb = logits.stride(0);
  a.logits_sk = logits.stride(1);
  a.history = history.data_ptr();
  a.hist_s0 = history.stride(0);
  a.hist_s1 = history.stride(1);
  a.hist_s2 = history.stride(2);
  a.slot = buffer ? slot->data_ptr<int64_t>() : nullptr;
  a.first_frame = buffer ? first_frame->data_ptr<int64_t>() : nullptr;
  a.num_frames = buffer ? num_frames->data_ptr<int64_t>() : nullptr;
  a.window = static_cast<int>(window);
  a.temperature = temperature.data_ptr<float>();
  a.top_p = top_p.data_ptr<float>();
  a.top_k = top_k.data_ptr<int64_t>();
  a.penalty = penalty.data_ptr<float>();
  a.mask_eos = mask_eos.data_ptr<bool>();
  a.seed = seed.data_ptr<int64_t>();
  a.counter = counter.data_ptr<int64_t>();
  a.codes = codes.data_ptr<int64_t>();
  a.processed = processed.has_value() ? processed->data_ptr<float>() : nullptr;
  a.eos_id = static_cast<int>(eos_id);
  a.scan_log_x = static_cast<int>(torch_scan_log_x(static_cast<uint32_t>(B * kNumVq), kVocab));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_codebooks", [&] {
    if (hist_dtype == at::kInt) {
      sample_codebooks_kernel<scalar_t, int32_t><<<B * kNumVq, kThreads, 0, stream>>>(a);
    } else {
      sample_codebooks_kernel<scalar_t, int64_t><<<B * kNumVq, kThreads, 0, stream>>>(a);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return codes;
}

}  // namespace chattts_vllm
