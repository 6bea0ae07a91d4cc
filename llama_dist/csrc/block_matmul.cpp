// CPU matmuls on GGML-style blocks of 32 weights with 8-bit activations: llama.cpp's scheme.
//
// PyTorch's CPU int4 kernel multiplies bf16 activations and is compute-bound (~6 GB/s of packed
// weights on two cores). Quantizing each row of activations to int8 blocks once per call turns every
// block's dot product into integer multiply-adds (AVX2 maddubs: 32 products per instruction).
// Weights are row groups: 16 rows interleaved per block of 32 inputs, so one maddubs multiplies 4 inputs of
// 8 rows at once (one 512-bit dpbusd, of all 16) and the lanes of the sum are the rows' outputs: no
// horizontal sums, one scale multiply per 8 rows. A group's blocks follow one another, so a thread reads its
// rows as one sequential stream (two 8-row groups read side by side streamed at half the rate on an EPYC).
//   Q4_1 groups: {fp16 d[16], fp16 m[16], 256 bytes}, value = d * q + m. Byte 64c + 32h + 4j + t holds row
//     8h + j's input 4c + t (low nibble) and 16 + 4c + t (high nibble).
//   Q4_0 groups: the same without the mins, {fp16 d[16], 256 bytes}, value = d * (q - 8): m = -8 d, exact, so
//     a Q4_0 group computes what its Q4_1 form would, from 10% fewer bytes.
//   Q8_0 groups: {fp16 d[16], 512 bytes}, value = d * (u - 128): byte 64s + 32h + 4j + t holds row 8h + j's
//     input 4s + t plus 128 (unsigned, as dpbusd's first operand wants; the 128 comes off in integers).
// y[m, n] = sum over blocks b: d_w * d_x * dot(q_w, q_x) + m_w * d_x * sum(q_x).
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLAMA_DIST_AVX2 1
#endif
// AVX-512 VNNI (dpbusd: u8 x s8 products summed in fours straight into int32 lanes, one instruction for what
// maddubs + madd + add do) and its 32 vector registers, which hold tiles of 8 activation rows.
#if defined(LLAMA_DIST_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLAMA_DIST_VNNI 1
#endif

namespace {

constexpr int64_t QK = 32;

constexpr int GROUP_ROWS = 16;  // weight rows of a row group

struct GroupQ4_1 {  // 16 rows x 32 inputs
  uint16_t d[GROUP_ROWS], m[GROUP_ROWS];
  uint8_t qs[GROUP_ROWS / 2 * QK];
};
struct GroupQ4_0 {
  uint16_t d[GROUP_ROWS];
  uint8_t qs[GROUP_ROWS / 2 * QK];
};
struct GroupQ8_0 {
  uint16_t d[GROUP_ROWS];
  uint8_t qs[GROUP_ROWS * QK];
};
struct BlockQ8A {  // one block of quantized activations; sum = sum(qs), s = d * sum
  float d, s;
  int32_t sum;
  int8_t qs[QK];
};
static_assert(sizeof(GroupQ4_1) == 320, "a Q4_1 row group is 16 blocks of 20 bytes");
static_assert(sizeof(GroupQ4_0) == 288, "a Q4_0 row group is 16 blocks of 18 bytes");
static_assert(sizeof(GroupQ8_0) == 544, "a Q8_0 row group is 16 blocks of 34 bytes");
template <typename Group>
constexpr bool is_q8 = std::is_same_v<Group, GroupQ8_0>;

inline float half_to_float(uint16_t h) {
#ifdef LLAMA_DIST_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// A Q4 group's per-row minimum (the value of code 0) from its stored mins, or -8 d for Q4_0.
inline float group_min(const GroupQ4_1& g, int j, float) { return half_to_float(g.m[j]); }
inline float group_min(const GroupQ4_0&, int, float d) { return -8.f * d; }

// Row 8 half + j's code for inputs 4c + t (c = 0..7) of a group's block: a Q4 nibble or a Q8 byte (+ 128).
template <typename Group>
inline int code(const Group& g, int half, int j, int c, int t) {
  if constexpr (is_q8<Group>) return g.qs[64 * c + 32 * half + 4 * j + t];
  const uint8_t byte = g.qs[64 * (c % 4) + 32 * half + 4 * j + t];
  return c < 4 ? byte & 0x0F : byte >> 4;
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
    y[b].sum = sum;
    y[b].s = d * static_cast<float>(sum);
  }
}

#ifdef LLAMA_DIST_AVX2
inline __m256 eight_halves(const uint16_t* h) {  // 8 fp16 values as floats
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
}
inline __m256 half_mins(const GroupQ4_1& g, int half, __m256) { return eight_halves(g.m + 8 * half); }
inline __m256 half_mins(const GroupQ4_0&, int, __m256 d) { return _mm256_mul_ps(d, _mm256_set1_ps(-8.f)); }

// q[s]: a Q4 block's codes of inputs 4s..4s+3 of rows 8 half .. 8 half + 7 (dot_half reads Q8 codes row by row).
template <typename Group>
inline void half_codes(const Group& g, int half, __m256i* q) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int c = 0; c < 4; ++c) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.qs + 64 * c + 32 * half));
    q[c] = _mm256_and_si256(raw, low);
    q[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
  }
}
#endif

// Rows 8 half .. 8 half + 7 of a row group against R activation rows; out[r] receives their 8 outputs.
template <typename Group, int R>
void dot_half(const Group* w, int half, const BlockQ8A* const* x, int64_t nb, float* const* out) {
#ifdef LLAMA_DIST_AVX2
  __m256 acc[R], acc_min[R];
  for (int r = 0; r < R; ++r) acc[r] = acc_min[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 d = eight_halves(w[b].d + 8 * half);
    __m256i q[8];
    if constexpr (!is_q8<Group>) half_codes(w[b], half, q);
    for (int r = 0; r < R; ++r) {
      const BlockQ8A& a = x[r][b];
      int32_t a4[8];  // the block's 32 activations as 8 groups of 4 bytes
      std::memcpy(a4, a.qs, sizeof(a4));
      __m256i sum;
      if constexpr (is_q8<Group>) {
        // u = 16 hi + lo: two maddubs on nibbles (u itself would overflow its int16 pairs), the codes read
        // from cache for each row (16 registers cannot hold them and the tile's sums)
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        for (int s = 0; s < 8; ++s) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].qs + 64 * s + 32 * half));
          const __m256i xs = _mm256_set1_epi32(a4[s]);
          lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(raw, low), xs));
          hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low), xs));
        }
        sum = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_slli_epi32(_mm256_madd_epi16(hi, ones), 4));
        sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(128 * a.sum));
      } else {
        // 8 sub-sums of 4 products per row stay within int16: 8 * 2 * 15 * 127 < 32768
        __m256i sum16 = _mm256_maddubs_epi16(q[0], _mm256_set1_epi32(a4[0]));
        for (int s = 1; s < 8; ++s) sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(q[s], _mm256_set1_epi32(a4[s])));
        sum = _mm256_madd_epi16(sum16, ones);
      }
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a.d)), _mm256_cvtepi32_ps(sum), acc[r]);
      if constexpr (!is_q8<Group>) acc_min[r] = _mm256_fmadd_ps(half_mins(w[b], half, d), _mm256_set1_ps(a.s), acc_min[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r], _mm256_add_ps(acc[r], acc_min[r]));
#else
  float acc[R][8] = {};
  for (int64_t b = 0; b < nb; ++b) {
    for (int j = 0; j < 8; ++j) {
      const float d = half_to_float(w[b].d[8 * half + j]);
      for (int r = 0; r < R; ++r) {
        const BlockQ8A& a = x[r][b];
        int sum = 0;
        for (int c = 0; c < 8; ++c)
          for (int t = 0; t < 4; ++t) sum += code(w[b], half, j, c, t) * a.qs[4 * c + t];
        if constexpr (is_q8<Group>) acc[r][j] += d * a.d * static_cast<float>(sum - 128 * a.sum);
        else acc[r][j] += d * a.d * static_cast<float>(sum) + group_min(w[b], 8 * half + j, d) * a.s;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 8; ++j) out[r][j] = acc[r][j];
#endif
}

#ifdef LLAMA_DIST_VNNI
inline __m512 sixteen_halves(const uint16_t* h) {  // 16 fp16 values as floats
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
}
inline __m512 group_mins(const GroupQ4_1& g, __m512) { return sixteen_halves(g.m); }
inline __m512 group_mins(const GroupQ4_0&, __m512 d) { return _mm512_mul_ps(d, _mm512_set1_ps(-8.f)); }
inline __m512 group_mins(const GroupQ8_0&, __m512) { return _mm512_setzero_ps(); }

// q[s]: the codes of inputs 4s..4s+3 of the group's 16 rows.
template <typename Group>
inline void group_codes(const Group& g, __m512i* q) {
  if constexpr (is_q8<Group>) {
    for (int s = 0; s < 8; ++s) q[s] = _mm512_loadu_si512(g.qs + 64 * s);
  } else {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i raw = _mm512_loadu_si512(g.qs + 64 * c);
      q[c] = _mm512_and_si512(raw, low);
      q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
    }
  }
}
#endif

// A row group's 16 rows against R activation rows; out[r] receives 16 outputs. With AVX-512 in one pass, rows
// 0-7 in the low 256 bits and 8-15 in the high (each broadcast activation and each instruction serves 16 rows);
// without, one half after the other (the second reads the group from cache).
template <typename Group, int R>
void dot_group(const Group* w, const BlockQ8A* const* x, int64_t nb, float* const* out) {
#ifdef LLAMA_DIST_VNNI
  __m512 acc[R], acc_min[R];
  for (int r = 0; r < R; ++r) acc[r] = acc_min[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 d = sixteen_halves(w[b].d), m = group_mins(w[b], d);
    __m512i q[8];
    group_codes(w[b], q);
    for (int r = 0; r < R; ++r) {
      const BlockQ8A& a = x[r][b];
      int32_t a4[8];  // the block's 32 activations as 8 groups of 4 bytes
      std::memcpy(a4, a.qs, sizeof(a4));
      __m512i sum;
      if constexpr (R == 1) {  // four independent chains: dpbusd's latency is several cycles
        __m512i sums[4];
        for (int s = 0; s < 4; ++s) sums[s] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[s], _mm512_set1_epi32(a4[s]));
        for (int s = 4; s < 8; ++s) sums[s - 4] = _mm512_dpbusd_epi32(sums[s - 4], q[s], _mm512_set1_epi32(a4[s]));
        sum = _mm512_add_epi32(_mm512_add_epi32(sums[0], sums[1]), _mm512_add_epi32(sums[2], sums[3]));
      } else {  // one chain per row: the tile's rows are the independent chains
        sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], _mm512_set1_epi32(a4[0]));
        for (int s = 1; s < 8; ++s) sum = _mm512_dpbusd_epi32(sum, q[s], _mm512_set1_epi32(a4[s]));
      }
      if constexpr (is_q8<Group>) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * a.sum));
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(a.d)), _mm512_cvtepi32_ps(sum), acc[r]);
      if constexpr (!is_q8<Group>) acc_min[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s), acc_min[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out[r], _mm512_add_ps(acc[r], acc_min[r]));
#else
  for (int half = 0; half < 2; ++half) {
    float* outs[R];
    for (int r = 0; r < R; ++r) outs[r] = out[r] + 8 * half;
    dot_half<Group, R>(w, half, x, nb, outs);
  }
#endif
}

// The rows a product multiplies, in float32: x itself, or RMSNorm(x) * norm_weight, or silu(gate) * up of
// x = [gate, up] (a block's norms and SwiGLU folded into the matmul that follows them, so a decode step makes
// one call per projection). The norm's order of operations is the model's: (x * rsqrt(mean(x^2) + eps)) * w.
at::Tensor fold_in(const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight, double eps, bool gated,
                   const char* name) {
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), name, ": expects CPU activations [..., K]");
  const at::Tensor xf = x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  if (norm_weight.has_value()) {
    TORCH_CHECK(!gated && norm_weight->numel() == K, name, ": the norm's weight has ", norm_weight->numel(),
                " entries for rows of ", K);
    const at::Tensor w = norm_weight->to(at::kFloat).contiguous();
    at::Tensor out = at::empty_like(xf);
    const float *src = xf.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* row = src + m * K;
      float lanes[8] = {};
      for (int64_t k = 0; k < K; ++k) lanes[k % 8] += row[k] * row[k];
      float sum = 0.f;
      for (float lane : lanes) sum += lane;
      const float r = 1.f / std::sqrt(sum / static_cast<float>(K) + static_cast<float>(eps));
      for (int64_t k = 0; k < K; ++k) dst[m * K + k] = (row[k] * r) * wp[k];
    }
    return out;
  }
  if (gated) {
    TORCH_CHECK(K % 2 == 0, name, ": gated rows hold [gate, up] halves, not ", K, " values");
    const int64_t H = K / 2;
    at::Tensor out = at::empty({M, H}, xf.options());
    const float* src = xf.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float *gate = src + m * K, *up = gate + H;
      int64_t k = 0;
#ifdef LLAMA_DIST_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      for (; k + 8 <= H; k += 8) {
        const __m256 g = _mm256_loadu_ps(gate + k);
        const __m256 e = llama_dist_cpu::exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(dst + m * H + k, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + k)));
      }
#endif
      for (; k < H; ++k) dst[m * H + k] = gate[k] / (1.f + std::exp(-gate[k])) * up[k];
    }
    return out;
  }
  return xf;
}

// Each row of x [M, K] (float32) as 8-bit blocks of 32, quantized once per call.
std::vector<BlockQ8A> quantize_activations(const at::Tensor& xf, const char* name) {
  TORCH_CHECK(xf.size(1) % QK == 0, name, ": ", xf.size(1), " inputs are not whole blocks of 32");
  const int64_t M = xf.size(0), K = xf.size(1), nb = K / QK;
  std::vector<BlockQ8A> xq(M * nb);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xf.data_ptr<float>() + m * K, xq.data() + m * nb, nb);
  });
  return xq;
}

// y [M, N] float32 for rows xf [M, K], holding the residual where one is given (the block's skip connection,
// folded in: the products are added to it).
at::Tensor output_rows(const at::Tensor& xf, int64_t N, const c10::optional<at::Tensor>& residual, const char* name) {
  const int64_t M = xf.size(0);
  if (!residual.has_value()) return at::empty({M, N}, xf.options());
  TORCH_CHECK(residual->numel() == M * N, name, ": the residual must hold ", M, " rows of ", N);
  return residual->reshape({M, N}).to(at::kFloat).contiguous().clone();
}

// y [M, N] as x's leading dimensions [..., N], in x's dtype.
at::Tensor shaped_like(const at::Tensor& y, const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.view(shape).to(x.scalar_type());
}

// Calls tile(R, rows, m) for the activation rows in tiles of R = TILE_ROWS, then one at a time (R = 1): rows[i]
// points at row m + i's blocks, so a kernel reads its weights once per tile. A row's arithmetic is the same in
// either (so its result does not depend on the other rows).
#ifdef LLAMA_DIST_VNNI
constexpr int TILE_ROWS = 8;
#else
constexpr int TILE_ROWS = 4;  // AVX2's 16 vector registers hold the weights' 8 and two accumulators per row
#endif
template <typename Tile>
void for_row_tiles(const std::vector<BlockQ8A>& xq, int64_t M, int64_t nb, Tile tile) {
  int64_t m = 0;
  for (; m + TILE_ROWS <= M; m += TILE_ROWS) {
    const BlockQ8A* rows[TILE_ROWS];
    for (int i = 0; i < TILE_ROWS; ++i) rows[i] = &xq[(m + i) * nb];
    tile(std::integral_constant<int, TILE_ROWS>(), rows, m);
  }
  for (; m < M; ++m) {
    const BlockQ8A* rows[1] = {&xq[m * nb]};
    tile(std::integral_constant<int, 1>(), rows, m);
  }
}

void check_weights(const at::Tensor& w, int64_t row_bytes, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous(), name,
              ": blocks must be a contiguous CPU uint8 matrix");
  TORCH_CHECK(w.size(1) == row_bytes, name, ": the activations' length needs ", row_bytes,
              " bytes of blocks per row, the weights have ", w.size(1));
}

}  // namespace

namespace llama_dist_cpu {

// x [..., K] times row groups w [ceil(N / 16), K / 32 * sizeof(Group)] -> [..., N] (+ residual).
template <typename Group>
at::Tensor group_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                        double eps, bool gated, const c10::optional<at::Tensor>& residual, const char* name) {
  const at::Tensor xf = fold_in(x, norm_weight, eps, gated, name);
  const std::vector<BlockQ8A> xq = quantize_activations(xf, name);
  const int64_t M = xf.size(0), nb = xf.size(1) / QK, groups = w.size(0);
  check_weights(w, nb * static_cast<int64_t>(sizeof(Group)), name);
  TORCH_CHECK(groups == (N + GROUP_ROWS - 1) / GROUP_ROWS, name, ": ", groups, " row groups cannot hold ", N, " rows");
  at::Tensor y = output_rows(xf, N, residual, name);
  float* out = y.data_ptr<float>();
  const bool add = residual.has_value();
  const Group* blocks = reinterpret_cast<const Group*>(w.data_ptr<uint8_t>());
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = GROUP_ROWS * g, valid = std::min<int64_t>(GROUP_ROWS, N - n0);  // the last group's padding
      for_row_tiles(xq, M, nb, [&](auto tile_rows, const BlockQ8A* const* rows, int64_t m) {
        constexpr int R = decltype(tile_rows)::value;
        float sums[R][GROUP_ROWS];
        float* outs[R];
        for (int i = 0; i < R; ++i) outs[i] = sums[i];
        dot_group<Group, R>(blocks + g * nb, rows, nb, outs);
        for (int i = 0; i < R; ++i)
          for (int64_t j = 0; j < valid; ++j) {
            float& o = out[(m + i) * N + n0 + j];
            o = add ? o + sums[i][j] : sums[i][j];
          }
      });
    }
  });
  return shaped_like(y, x);
}

at::Tensor q4_1_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual) {
  return group_matmul<GroupQ4_1>(x, w, N, norm_weight, eps, gated, residual, "q4_1_matmul");
}

at::Tensor q4_0_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual) {
  return group_matmul<GroupQ4_0>(x, w, N, norm_weight, eps, gated, residual, "q4_0_matmul");
}

at::Tensor q8_0_matmul(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& norm_weight,
                       double eps, bool gated, const c10::optional<at::Tensor>& residual) {
  return group_matmul<GroupQ8_0>(x, w, N, norm_weight, eps, gated, residual, "q8_0_matmul");
}

}  // namespace llama_dist_cpu

TORCH_LIBRARY_FRAGMENT(llama_dist, m) {
  // norm_weight: RMSNorm x first; gated: x is [gate, up], multiply silu(gate) * up; residual: added to the product
  m.def("q4_1_matmul(Tensor x, Tensor blocks, int n, Tensor? norm_weight=None, float eps=0.0, bool gated=False, "
        "Tensor? residual=None) -> Tensor");
  m.def("q4_0_matmul(Tensor x, Tensor blocks, int n, Tensor? norm_weight=None, float eps=0.0, bool gated=False, "
        "Tensor? residual=None) -> Tensor");
  m.def("q8_0_matmul(Tensor x, Tensor blocks, int n, Tensor? norm_weight=None, float eps=0.0, bool gated=False, "
        "Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_dist, CPU, m) {
  m.impl("q4_1_matmul", &llama_dist_cpu::q4_1_matmul);
  m.impl("q4_0_matmul", &llama_dist_cpu::q4_0_matmul);
  m.impl("q8_0_matmul", &llama_dist_cpu::q8_0_matmul);
}
