// The C++ CPU kernels one source file calls from another (their ops are registered where they are defined).
#pragma once

#include <ATen/ATen.h>

namespace llama_dist_cpu {

// x [..., K] times weight blocks -> [..., N]: RMSNorm(x) * norm_weight first where given, silu(gate) * up of
// x = [gate, up] where gated, plus residual where given (block_matmul.cpp).
at::Tensor q4_1_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual);
at::Tensor q4_0_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual);
at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual);

// One decoded token per row: rotary, cache write at pos, attention over [0, pos] (decode_attention.cpp).
at::Tensor cpu_decode_attention(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& cache_k,
                                at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& pos, int64_t n_rep);

}  // namespace llama_dist_cpu
