// Registers the csrc ops as torch.ops.chattts_vllm.*; chattts_vllm/ops.py wraps them.
// Importing chattts_vllm._C (the module stub below) runs the registration.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(chattts_vllm, m) {
  // codes [B, 4] int64. history: [B, 4, window] ids (-1 = empty), or with slot/first_frame/num_frames
  // a code buffer [S, T, 4] whose window is buffer[slot, first_frame + max(0, j - window) :
  // first_frame + j, k] for j = num_frames. processed (optional out): [B, 4, 626] float32.
  m.def(
      "sample_codebooks(Tensor logits, Tensor history, Tensor? slot, Tensor? first_frame, "
      "Tensor? num_frames, int window, Tensor temperature, Tensor top_p, Tensor top_k, "
      "Tensor penalty, Tensor mask_eos, Tensor seed, Tensor counter, int eos_id, "
      "Tensor(a!)? processed) -> Tensor");
}

TORCH_LIBRARY_IMPL(chattts_vllm, CUDA, m) {
  m.impl("sample_codebooks", &chattts_vllm::sample_codebooks_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "chattts-vllm CUDA ops; registered as torch.ops.chattts_vllm.*";
}
