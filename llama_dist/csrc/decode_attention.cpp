// One decoded token's attention per row on CPUs: rotary embedding, cache write and attention over the
// cache in one call per layer (the CPU counterpart of kernels/decode_attention.py's Triton kernel).
//
// In PyTorch this is two dozen small operations per layer, each paying a dispatch that costs more than
// its arithmetic for one token. The new keys (rotated, Meta's interleaved pairs) and values go to their
// rows' places in the paged cache, then each (row, query head) is one task: softmax(q k^T / sqrt(d)) v over
// exactly the positions [0, pos] the row sees, in float32. A row's arithmetic is the same whatever else is in
// the batch, and wherever its blocks lie.
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

// One (cache row, kv head)'s keys or values in the paged cache: position p is in block p >> shift, at offset
// p & mask of it (blocks of 1 << shift positions, a power of two and a multiple of 8).
template <typename T>
struct Paged {
  const T* const* blocks;
  int64_t shift, mask, hd;
  const T* at(int64_t p) const { return blocks[p >> shift] + (p & mask) * hd; }
};

// One query head over its kv head's cache positions [0, last]: out = softmax(q k^T * scale) v, in float32.
// Any cache dtype, element by element; float32 caches (the CPU default) take the AVX2 version below.
template <typename T>
void attend_head(const float* q, const Paged<T>& keys, const Paged<T>& values, int64_t last, int64_t hd, float scale,
                 float* scores, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t p = 0; p <= last; ++p) {
    float lanes[8] = {};
    const T* key = keys.at(p);
    for (int64_t i = 0; i < hd; i += 8)
      for (int j = 0; j < 8; ++j) lanes[j] += q[i + j] * static_cast<float>(key[i + j]);
    float sum = 0.f;
    for (float lane : lanes) sum += lane;
    scores[p] = sum * scale;
    top = std::max(top, scores[p]);
  }
  float total = 0.f;
  std::fill(out, out + hd, 0.f);
  for (int64_t p = 0; p <= last; ++p) {
    const float w = std::exp(scores[p] - top);
    total += w;
    const T* value = values.at(p);
    for (int64_t i = 0; i < hd; ++i) out[i] += w * static_cast<float>(value[i]);
  }
  for (int64_t i = 0; i < hd; ++i) out[i] /= total;
}

#if defined(__AVX2__) && defined(__FMA__)
// The 8 lane sums of t[0..7], in one vector (lane j: the sum of t[j]'s lanes).
inline __m256 transpose_sums(const __m256* t) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(t[4], t[5]), _mm256_hadd_ps(t[6], t[7]));
  // a: lanes (0,1,2,3 | 0,1,2,3) halves of t[0..3]'s sums; b: the same for t[4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// float32 caches: eight positions' scores at a time (no horizontal sum per position), the exponentials eight
// lanes at a time, and the weighted sum of values one 8-float column at a time with four accumulators over
// positions (no store and reload of a running sum per position). Eight (or four) positions from a multiple
// of eight (four) lie in one block.
template <>
void attend_head<float>(const float* q, const Paged<float>& keys, const Paged<float>& values, int64_t last,
                        int64_t hd, float scale, float* scores, float* out) {
  const int64_t n = last + 1, nv = hd / 8, block = keys.mask + 1;
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    __m256 t[8];
    for (int j = 0; j < 8; ++j) t[j] = _mm256_setzero_ps();
    const float* eight = keys.at(p);
    for (int64_t v = 0; v < nv; ++v) {
      const __m256 qv = _mm256_loadu_ps(q + 8 * v);
      for (int j = 0; j < 8; ++j) t[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(eight + j * hd + 8 * v), t[j]);
    }
    const __m256 s = _mm256_mul_ps(transpose_sums(t), _mm256_set1_ps(scale));
    _mm256_storeu_ps(scores + p, s);
    top = _mm256_max_ps(top, s);
  }
  float m = -std::numeric_limits<float>::infinity();
  for (; p < n; ++p) {
    __m256 t = _mm256_setzero_ps();
    const float* key = keys.at(p);
    for (int64_t v = 0; v < nv; ++v) t = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), _mm256_loadu_ps(key + 8 * v), t);
    scores[p] = llama_dist_cpu::hsum(t) * scale;
    m = std::max(m, scores[p]);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  for (const float lane : lanes) m = std::max(m, lane);
  const __m256 shift = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  for (p = 0; p + 8 <= n; p += 8) {
    const __m256 w = llama_dist_cpu::exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + p), shift));
    _mm256_storeu_ps(scores + p, w);
    total = _mm256_add_ps(total, w);
  }
  for (; p < n; ++p) {  // the last few through the same vector exp, one lane used
    const __m256 w = llama_dist_cpu::exp_ps(_mm256_set1_ps(scores[p] - m));
    scores[p] = _mm256_cvtss_f32(w);
    total = _mm256_add_ps(total, _mm256_setr_ps(scores[p], 0, 0, 0, 0, 0, 0, 0));
  }
  const __m256 inv = _mm256_set1_ps(1.f / llama_dist_cpu::hsum(total));
  for (int64_t v = 0; v < nv; ++v) {  // a block at a time: its positions are one stretch of memory
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t start = 0; start < n; start += block) {
      const float *column = values.at(start) + 8 * v, *w = scores + start;
      const int64_t m = std::min(block, n - start);
      int64_t j = 0;
      for (; j + 4 <= m; j += 4)
        for (int i = 0; i < 4; ++i)
          acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(w[j + i]), _mm256_loadu_ps(column + (j + i) * hd), acc[i]);
      for (; j < m; ++j) acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(column + j * hd), acc[0]);
    }
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    _mm256_storeu_ps(out + 8 * v, _mm256_mul_ps(sum, inv));
  }
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
                 const int64_t* table, int64_t per_row, const int64_t* slots, const int64_t* pos, int64_t n_rep,
                 at::Tensor& out) {
  const int64_t B = qkv.size(0), n_kv = cache_k.size(1), block = cache_k.size(2), hd = cache_k.size(3);
  const int64_t n_heads = n_kv * n_rep, row_len = (n_heads + 2 * n_kv) * hd, shift = __builtin_ctzll(block);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const T* src = qkv.data_ptr<T>();
  const float* rot = rope.data_ptr<float>();
  T *keys = cache_k.data_ptr<T>(), *values = cache_v.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  // where row b's kv head g keeps position p
  auto place = [&](T* cache, int64_t b, int64_t g, int64_t p) {
    return cache + ((table[slots[b] * per_row + (p >> shift)] * n_kv + g) * block + (p & (block - 1))) * hd;
  };
  std::vector<float> k(hd);
  for (int64_t b = 0; b < B; ++b)  // the new keys (rotated) and values into the cache first
    for (int64_t g = 0; g < n_kv; ++g) {
      const T* row = src + b * row_len;
      rotate(row + (n_heads + g) * hd, rot + b * hd, hd, k.data());
      T *k_at = place(keys, b, g, pos[b]), *v_at = place(values, b, g, pos[b]);
      for (int64_t i = 0; i < hd; ++i) {
        k_at[i] = static_cast<T>(k[i]);
        v_at[i] = row[(n_heads + n_kv + g) * hd + i];
      }
    }
  // then one task per query head (its kv head's cache is read by n_rep tasks, from cache)
  at::parallel_for(0, B * n_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(hd), acc(hd), scores;
    std::vector<const T*> key_blocks, value_blocks;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_heads, h = t % n_heads, g = h / n_rep;
      rotate(src + b * row_len + h * hd, rot + b * hd, hd, q.data());
      scores.resize(pos[b] + 1);
      key_blocks.resize((pos[b] >> shift) + 1);
      value_blocks.resize(key_blocks.size());
      for (size_t j = 0; j < key_blocks.size(); ++j) {
        key_blocks[j] = place(keys, b, g, static_cast<int64_t>(j) << shift);
        value_blocks[j] = place(values, b, g, static_cast<int64_t>(j) << shift);
      }
      attend_head<T>(q.data(), Paged<T>{key_blocks.data(), shift, block - 1, hd},
                     Paged<T>{value_blocks.data(), shift, block - 1, hd}, pos[b], hd, scale, scores.data(), acc.data());
      for (int64_t i = 0; i < hd; ++i) dst[(b * n_heads + h) * hd + i] = static_cast<T>(acc[i]);
    }
  });
}

}  // namespace

namespace llama_dist_cpu {

// qkv [B, (n_kv * n_rep + 2 n_kv) * head_dim]: each row's new q, k, v heads before the rotary embedding;
// rope [B, head_dim / 2, 2] (cos, sin); caches [blocks, n_kv, block, head_dim] in qkv's dtype, paged by
// block_table [rows, blocks per row] (cache row r's position p: block block_table[r, p / block], offset
// p % block); row b writes cache row slots[b] at position pos[b] and sees [0, pos[b]].
// Returns [B, n_kv * n_rep * head_dim].
at::Tensor cpu_decode_attention(const at::Tensor& qkv, const at::Tensor& rope, at::Tensor& cache_k,
                                at::Tensor& cache_v, const at::Tensor& block_table, const at::Tensor& slots,
                                const at::Tensor& pos, int64_t n_rep) {
  TORCH_CHECK(qkv.dim() == 2 && cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() && block_table.dim() == 2,
              "cpu_decode_attention: qkv [B, width], caches [blocks, kv heads, block, head_dim], a block table");
  TORCH_CHECK(qkv.scalar_type() == cache_k.scalar_type() && cache_k.scalar_type() == cache_v.scalar_type() &&
              cache_k.is_contiguous() && cache_v.is_contiguous(),
              "cpu_decode_attention: contiguous caches in the activations' dtype");
  const int64_t B = qkv.size(0), n_blocks = cache_k.size(0), n_kv = cache_k.size(1), block = cache_k.size(2),
                hd = cache_k.size(3);
  TORCH_CHECK(block >= 8 && (block & (block - 1)) == 0, "cpu_decode_attention: cache blocks of a power of two "
              "positions, at least 8, not ", block);
  TORCH_CHECK(hd % 8 == 0 && qkv.size(1) == (n_kv * n_rep + 2 * n_kv) * hd, "cpu_decode_attention: qkv rows of ",
              qkv.size(1), " values do not hold ", n_kv * n_rep, " + 2 x ", n_kv, " heads of ", hd);
  const at::Tensor rows = slots.to(at::kLong).contiguous(), at_pos = pos.to(at::kLong).contiguous();
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  const at::Tensor rot = rope.to(at::kFloat).contiguous(), x = qkv.contiguous();
  TORCH_CHECK(rows.numel() == B && at_pos.numel() == B && rot.numel() == B * hd,
              "cpu_decode_attention: one slot, position and rotation per row");
  const int64_t per_row = table.size(1), *t = table.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = rows.data_ptr<int64_t>()[b], p = at_pos.data_ptr<int64_t>()[b];
    TORCH_CHECK(r >= 0 && r < table.size(0) && p >= 0 && p < per_row * block,
                "cpu_decode_attention: row ", b, " is outside the cache");
    for (int64_t j = 0; j <= p / block; ++j)
      TORCH_CHECK(t[r * per_row + j] >= 0 && t[r * per_row + j] < n_blocks, "cpu_decode_attention: cache row ", r,
                  " names block ", t[r * per_row + j], " of ", n_blocks);
  }
  at::Tensor out = at::empty({B, n_kv * n_rep * hd}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "cpu_decode_attention", [&] {
    attend_rows<scalar_t>(x, rot, cache_k, cache_v, t, per_row, rows.data_ptr<int64_t>(), at_pos.data_ptr<int64_t>(),
                          n_rep, out);
  });
  return out;
}

}  // namespace llama_dist_cpu

TORCH_LIBRARY_FRAGMENT(llama_dist, m) {
  m.def("cpu_decode_attention(Tensor qkv, Tensor rope, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor block_table, "
        "Tensor slots, Tensor pos, int n_rep) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_dist, CPU, m) {
  m.impl("cpu_decode_attention", &llama_dist_cpu::cpu_decode_attention);
}
