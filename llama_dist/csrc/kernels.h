// What the C++ CPU kernels' source files share: the kernels one calls from another (their ops are registered
// where they are defined) and small vector helpers.
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

// exp(x) of 8 lanes: Cephes' expf polynomial, relative error < 2e-7; x is clamped to [-87, 88] (so 2^n stays a
// normal float): below, exp(-87) ~ 1.6e-38 rather than 0 (nothing next to a softmax's top score of 1), above,
// exp(88) ~ 1.7e38 (a SiLU's 1 / (1 + e^-x) is 0 either way).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, ln 2 in two parts
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}
#endif

// x [..., K] times weight blocks -> [..., N]: RMSNorm(x) * norm_weight first where given, silu(gate) * up of
// x = [gate, up] where gated, plus residual where given (block_matmul.cpp).
at::Tensor q4_1_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual);
at::Tensor q4_0_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual);
at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual);

// One decoded token per row: rotary, cache write at pos, attention over [0, pos] in the paged cache
// (decode_attention.cpp).
at::Tensor cpu_decode_attention(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& cache_k,
                                at::Tensor& cache_v, const at::Tensor& block_table, const at::Tensor& slots,
                                const at::Tensor& pos, int64_t n_rep);

}  // namespace llama_dist_cpu
