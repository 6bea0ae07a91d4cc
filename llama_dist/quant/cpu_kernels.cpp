// CPU matmuls on GGML blocks of 32 weights with 8-bit activations: llama.cpp's scheme.
//
// PyTorch's CPU int4 kernel multiplies bf16 activations and is compute-bound (~6 GB/s of packed
// weights on two cores). Quantizing each row of activations to int8 blocks once per call turns every
// block's dot product into integer multiply-adds (AVX2 maddubs: 32 products per instruction), so a
// decode step is bound by reading the weights again. The weights stay in the file's byte layout:
//   Q4_1: {fp16 d, fp16 m, 16 bytes of nibbles}, value = d * q + m (low nibbles: elements 0-15)
//   Q8_0: {fp16 d, 32 int8}, value = d * q
// y[m, n] = sum over blocks b of row n: d_w * d_x * dot(q_w, q_x) (+ m_w * d_x * sum(q_x) for Q4_1).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLAMA_DIST_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;

struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[QK / 2];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[QK];
};
struct BlockQ8A {  // one block of quantized activations; s = d * sum(qs)
  float d, s;
  int8_t qs[QK];
};
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block is 20 bytes");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block is 34 bytes");

inline float half_to_float(uint16_t h) {
#ifdef LLAMA_DIST_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// Round to nearest even, as the vector path does, so both paths quantize alike.
void quantize_row(const float* x, BlockQ8A* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += QK) {
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int q = static_cast<int>(std::nearbyint(x[j] * id));
      y[b].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    y[b].d = d;
    y[b].s = d * static_cast<float>(sum);
  }
}

#ifdef LLAMA_DIST_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i unpack_nibbles(const uint8_t* p) {  // 16 bytes -> 32 values 0..15 in element order
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

inline __m256 dot_u8_s8(__m256i u, __m256i s) {  // 32 products summed in pairs, then in fours, as floats
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

// One weight row against R activation rows: the row's blocks are unpacked once for all R. Even and odd
// blocks sum into separate accumulators: one chain of dependent fused multiply-adds would wait on
// the previous one's latency at every block.
template <int R>
void dot_q4_1(const BlockQ4_1* w, const BlockQ8A* const* x, int64_t nb, float* out) {
  float mins[2][R] = {};
#ifdef LLAMA_DIST_AVX2
  __m256 acc[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* acc_k, float* mins_k) __attribute__((always_inline)) {
    const float d = half_to_float(w[b].d), m = half_to_float(w[b].m);
    const __m256i q = unpack_nibbles(w[b].qs);
    for (int r = 0; r < R; ++r) {
      const BlockQ8A& a = x[r][b];
      const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs));
      acc_k[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot_u8_s8(q, qa), acc_k[r]);
      mins_k[r] += m * a.s;
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, acc[0], mins[0]);
    block(b + 1, acc[1], mins[1]);
  }
  if (b < nb) block(b, acc[0], mins[0]);
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + mins[0][r] + mins[1][r];
#else
  float acc[2][R] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const int k = b & 1;
    const float d = half_to_float(w[b].d), m = half_to_float(w[b].m);
    for (int r = 0; r < R; ++r) {
      const BlockQ8A& a = x[r][b];
      int sum = 0;
      for (int j = 0; j < QK / 2; ++j)
        sum += (w[b].qs[j] & 0x0F) * a.qs[j] + (w[b].qs[j] >> 4) * a.qs[j + QK / 2];
      acc[k][r] += d * a.d * static_cast<float>(sum);
      mins[k][r] += m * a.s;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[0][r] + acc[1][r] + mins[0][r] + mins[1][r];
#endif
}

template <int R>
void dot_q8_0(const BlockQ8_0* w, const BlockQ8A* const* x, int64_t nb, float* out) {
#ifdef LLAMA_DIST_AVX2
  __m256 acc[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* acc_k) __attribute__((always_inline)) {
    const float d = half_to_float(w[b].d);
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs));
    const __m256i q_abs = _mm256_sign_epi8(q, q);  // maddubs wants one unsigned operand: move q's sign over
    for (int r = 0; r < R; ++r) {
      const BlockQ8A& a = x[r][b];
      const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs));
      acc_k[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot_u8_s8(q_abs, _mm256_sign_epi8(qa, q)), acc_k[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, acc[0]);
    block(b + 1, acc[1]);
  }
  if (b < nb) block(b, acc[0]);
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
#else
  float acc[2][R] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const int k = b & 1;
    const float d = half_to_float(w[b].d);
    for (int r = 0; r < R; ++r) {
      const BlockQ8A& a = x[r][b];
      int sum = 0;
      for (int j = 0; j < QK; ++j) sum += w[b].qs[j] * a.qs[j];
      acc[k][r] += d * a.d * static_cast<float>(sum);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[0][r] + acc[1][r];
#endif
}

// x [M, K] (any float dtype) times the block rows w [N, K / 32 * sizeof(Block)] -> float32 [M, N].
template <typename Block, void (*Dot1)(const Block*, const BlockQ8A* const*, int64_t, float*),
          void (*Dot4)(const Block*, const BlockQ8A* const*, int64_t, float*)>
at::Tensor block_matmul(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, name, ": expects x [M, K] and blocks [N, K/32 * block bytes]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), name, ": blocks must be contiguous uint8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), nb = K / QK;
  TORCH_CHECK(K % QK == 0 && w.size(1) == nb * static_cast<int64_t>(sizeof(Block)), name,
              ": x has ", K, " inputs, which does not match blocks of ", w.size(1), " bytes per row");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  std::vector<BlockQ8A> xq(M * nb);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xf.data_ptr<float>() + m * K, xq.data() + m * nb, nb);
  });
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  const Block* blocks = reinterpret_cast<const Block*>(w.data_ptr<uint8_t>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const Block* row = blocks + n * nb;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        const BlockQ8A* rows[4] = {&xq[m * nb], &xq[(m + 1) * nb], &xq[(m + 2) * nb], &xq[(m + 3) * nb]};
        float r[4];
        Dot4(row, rows, nb, r);
        for (int i = 0; i < 4; ++i) out[(m + i) * N + n] = r[i];
      }
      for (; m < M; ++m) {
        const BlockQ8A* rows[1] = {&xq[m * nb]};
        Dot1(row, rows, nb, out + m * N + n);
      }
    }
  });
  return y;
}

at::Tensor q4_1_matmul(const at::Tensor& x, const at::Tensor& w) {
  return block_matmul<BlockQ4_1, dot_q4_1<1>, dot_q4_1<4>>(x, w, "q4_1_matmul");
}

at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& w) {
  return block_matmul<BlockQ8_0, dot_q8_0<1>, dot_q8_0<4>>(x, w, "q8_0_matmul");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_dist, m) {
  m.def("q4_1_matmul(Tensor x, Tensor blocks) -> Tensor");
  m.def("q8_0_matmul(Tensor x, Tensor blocks) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_dist, CPU, m) {
  m.impl("q4_1_matmul", &q4_1_matmul);
  m.impl("q8_0_matmul", &q8_0_matmul);
}
