// One decoded token's attention per row on CPUs: rotary embedding, cache write and attention over the
// cache in one call per layer (the CPU counterpart of kernels/decode_attention.py's Triton kernel).
//
// In PyTorch this is two dozen small operations per layer, each paying a dispatch that costs more than
// its arithmetic for one token. Each (row, kv head) is one task: it rotates the new key (Meta's
// interleaved pairs) and writes it and the value to the row's cache slot, then for each of its n_rep
// query heads computes softmax(q k^T / sqrt(d)) v over exactly the positions [0, pos] the row sees, in
// float32. A row's arithmetic is the same whatever else is in the batch.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

template <typename T>
float dot(const float* q, const T* k, int64_t n) {
  float lanes[8] = {};
  for (int64_t i = 0; i < n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += q[i + j] * static_cast<float>(k[i + j]);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  return sum;
}

template <typename T>
void add_scaled(float w, const T* v, float* acc, int64_t n) {  // acc += w v
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<float>(v[i]);
}

#if defined(__AVX2__) && defined(__FMA__)
// float32 caches (the CPU default): 8 lanes per instruction, two accumulators.
template <>
float dot<float>(const float* q, const float* k, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), a1);
  }
  if (i < n) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
  return llama_dist_cpu::hsum(_mm256_add_ps(a0, a1));
}

template <>
void add_scaled<float>(float w, const float* v, float* acc, int64_t n) {
  const __m256 ws = _mm256_set1_ps(w);
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(ws, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
}
#endif

// x's pairs (x[2i], x[2i + 1]) rotated by (cos_i, sin_i) = rope[2i], rope[2i + 1]; the result rounded to T
// (the model rotates in float32 and stores in its activation dtype), returned in float32.
template <typename T>
void rotate(const T* x, const float* rope, int64_t head_dim, float* out) {
  for (int64_t i = 0; i < head_dim; i += 2) {
    const float x0 = static_cast<float>(x[i]), x1 = static_cast<float>(x[i + 1]);
    const float c = rope[i], s = rope[i + 1];
    out[i] = static_cast<float>(static_cast<T>(x0 * c - x1 * s));
    out[i + 1] = static_cast<float>(static_cast<T>(x0 * s + x1 * c));
  }
}

template <typename T>
void attend_rows(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& cache_k, at::Tensor& cache_v,
                 const int64_t* slots, const int64_t* pos, int64_t n_rep, at::Tensor& out) {
  const int64_t B = qkv.size(0), n_kv = cache_k.size(1), L = cache_k.size(2), hd = cache_k.size(3);
  const int64_t n_heads = n_kv * n_rep, row_len = (n_heads + 2 * n_kv) * hd;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const T* src = qkv.data_ptr<T>();
  const float* rot = rope.data_ptr<float>();
  T *keys = cache_k.data_ptr<T>(), *values = cache_v.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, B * n_kv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(hd), acc(hd), scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_kv, g = t % n_kv, last = pos[b];
      const T* row = src + b * row_len;
      const float* r = rot + b * hd;
      T* k_base = keys + (slots[b] * n_kv + g) * L * hd;
      T* v_base = values + (slots[b] * n_kv + g) * L * hd;
      rotate(row + (n_heads + g) * hd, r, hd, q.data());
      for (int64_t i = 0; i < hd; ++i) {
        k_base[last * hd + i] = static_cast<T>(q[i]);
        v_base[last * hd + i] = row[(n_heads + n_kv + g) * hd + i];
      }
      scores.resize(last + 1);
      for (int64_t h = g * n_rep; h < (g + 1) * n_rep; ++h) {
        rotate(row + h * hd, r, hd, q.data());
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p <= last; ++p) {
          scores[p] = dot(q.data(), k_base + p * hd, hd) * scale;
          top = std::max(top, scores[p]);
        }
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t p = 0; p <= last; ++p) {
          const float w = std::exp(scores[p] - top);
          total += w;
          add_scaled(w, v_base + p * hd, acc.data(), hd);
        }
        for (int64_t i = 0; i < hd; ++i) dst[b * n_heads * hd + h * hd + i] = static_cast<T>(acc[i] / total);
      }
    }
  });
}

}  // namespace

namespace llama_dist_cpu {

// qkv [B, (n_kv * n_rep + 2 n_kv) * head_dim]: each row's new q, k, v heads before the rotary embedding;
// rope [B, head_dim / 2, 2] (cos, sin); caches [rows, n_kv, L, head_dim] in qkv's dtype; row b writes cache
// row slots[b] at position pos[b] and sees [0, pos[b]]. Returns [B, n_kv * n_rep * head_dim].
at::Tensor cpu_decode_attention(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& cache_k,
                                at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& pos, int64_t n_rep) {
  TORCH_CHECK(qkv.dim() == 2 && cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes(),
              "cpu_decode_attention: qkv [B, width] and caches [rows, kv heads, L, head_dim]");
  TORCH_CHECK(qkv.scalar_type() == cache_k.scalar_type() && cache_k.scalar_type() == cache_v.scalar_type() &&
              cache_k.is_contiguous() && cache_v.is_contiguous(),
              "cpu_decode_attention: contiguous caches in the activations' dtype");
  const int64_t B = qkv.size(0), n_kv = cache_k.size(1), hd = cache_k.size(3);
  TORCH_CHECK(hd % 8 == 0 && qkv.size(1) == (n_kv * n_rep + 2 * n_kv) * hd, "cpu_decode_attention: qkv rows of ",
              qkv.size(1), " values do not hold ", n_kv * n_rep, " + 2 x ", n_kv, " heads of ", hd);
  const at::Tensor rows = slots.to(at::kLong).contiguous(), at_pos = pos.to(at::kLong).contiguous();
  const at::Tensor rot = rope.to(at::kFloat).contiguous(), x = qkv.contiguous();
  TORCH_CHECK(rows.numel() == B && at_pos.numel() == B && rot.numel() == B * hd,
              "cpu_decode_attention: one slot, position and rotation per row");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(rows.data_ptr<int64_t>()[b] >= 0 && rows.data_ptr<int64_t>()[b] < cache_k.size(0) &&
                at_pos.data_ptr<int64_t>()[b] >= 0 && at_pos.data_ptr<int64_t>()[b] < cache_k.size(2),
                "cpu_decode_attention: row ", b, " is outside the cache");
  at::Tensor out = at::empty({B, n_kv * n_rep * hd}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "cpu_decode_attention", [&] {
    attend_rows<scalar_t>(x, rot, cache_k, cache_v, rows.data_ptr<int64_t>(), at_pos.data_ptr<int64_t>(), n_rep, out);
  });
  return out;
}

}  // namespace llama_dist_cpu

TORCH_LIBRARY_FRAGMENT(llama_dist, m) {
  m.def("cpu_decode_attention(Tensor qkv, Tensor rope, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, "
        "Tensor pos, int n_rep) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_dist, CPU, m) {
  m.impl("cpu_decode_attention", &llama_dist_cpu::cpu_decode_attention);
}
