// Host entry points of the csrc ops: defined in the .cu files, registered in torch_bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace chattts_vllm {

// The fused ChatTTS 4-codebook sampling step (see torch_bindings.cpp for the schema).
at::Tensor sample_codebooks_cuda(const at::Tensor& logits, const at::Tensor& history,
                                 const std::optional<at::Tensor>& slot,
                                 const std::optional<at::Tensor>& first_frame,
                                 const std::optional<at::Tensor>& num_frames, int64_t window,
                                 const at::Tensor& temperature, const at::Tensor& top_p,
                                 const at::Tensor& top_k, const at::Tensor& penalty,
                                 const at::Tensor& mask_eos, const at::Tensor& seed,
                                 const at::Tensor& counter, int64_t eos_id,
                                 const std::optional<at::Tensor>& processed);

}  // namespace chattts_vllm
