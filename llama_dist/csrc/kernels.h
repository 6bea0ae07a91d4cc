// What the C++ CPU kernels' source files share: the kernels one calls from another (their ops are registered
// where they are defined) and a small vector helper.
#pragma once

#include <ATen/ATen.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace llama_dist_cpu {

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {  // the sum of the 8 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

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
