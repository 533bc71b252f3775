// write_frame_records: one engine step's side-channel records into the requests' memory maps.
//
// The model runner V2 sink (chattts_vllm/runners/outputs.py) gets each step's records in one
// pinned int32 buffer, row i = [marker, 4 codes, hidden (fp32 bits)], and row i's destination
// address in its request's mmap (0 = no record). Copying them here, in one call with the GIL
// released, replaces a Python loop of up to 512 rows a step that held the GIL the engine's
// scheduler thread needs. Same contract as the Python twin (`write_records_twin`): payload
// first, then the marker with release order, so a reader that sees the marker sees the payload.
//
// Self-contained (its own library fragment, CPU only, no CUDA) so that the CPU test suite can
// build it alone with torch.utils.cpp_extension.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace chattts_vllm {

void write_frame_records(const at::Tensor& records, const at::Tensor& dest) {
  TORCH_CHECK(records.device().is_cpu() && records.scalar_type() == at::kInt && records.dim() == 2 &&
                  records.is_contiguous(),
              "write_frame_records: records must be a contiguous CPU int32 [n, words] tensor");
  TORCH_CHECK(dest.device().is_cpu() && dest.scalar_type() == at::kLong && dest.dim() == 1 &&
                  dest.is_contiguous() && dest.size(0) <= records.size(0),
              "write_frame_records: dest must be a contiguous CPU int64 [n] tensor, n <= rows");
  const int64_t n = dest.size(0);
  const int64_t words = records.size(1);
  TORCH_CHECK(words >= 1, "write_frame_records: a record needs its marker word");
  const int32_t* rec = records.data_ptr<int32_t>();
  const int64_t* dst = dest.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (dst[i] == 0) continue;
    auto* row = reinterpret_cast<int32_t*>(static_cast<uintptr_t>(dst[i]));
    const int32_t* src = rec + i * words;
    std::memcpy(row + 1, src + 1, static_cast<size_t>(words - 1) * sizeof(int32_t));
    __atomic_store_n(row, src[0], __ATOMIC_RELEASE);
  }
}

}  // namespace chattts_vllm

TORCH_LIBRARY_FRAGMENT(chattts_vllm, m) {
  // records [n', words] int32 (rows past dest's length are ignored), dest [n] int64 addresses.
  m.def("write_frame_records(Tensor records, Tensor dest) -> ()");
}

TORCH_LIBRARY_IMPL(chattts_vllm, CPU, m) { m.impl("write_frame_records", &chattts_vllm::write_frame_records); }
