// A decode step's blocks in one call (one process, no tensor parallelism): for each layer, Meta's two lines
//   h = x + wo(attention(rope(wqkv(attention_norm(x)))));  out = h + w2(silu(w1 h') * w3 h'), h' = ffn_norm(h)
// through the same kernels and in the same order as the per-layer calls (kernels/fused.py's
// FusedTransformerBlock), so the results are identical; what goes is Python's and the dispatcher's time
// between those calls, which for a small model is as long as the arithmetic.
#include "kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace {

enum Format : int64_t { Q4_1 = 0, Q4_0 = 1, Q8_0 = 2 };  // quant/weights.py: BLOCK_FORMATS

at::Tensor product(int64_t format, const at::Tensor& x, const at::Tensor& w, int64_t n,
                   const c10::optional<at::Tensor>& norm_weight, double eps, bool gated,
                   const c10::optional<at::Tensor>& residual) {
  switch (format) {
    case Q4_1: return llama_dist_cpu::q4_1_matmul(x, w, n, norm_weight, eps, gated, residual);
    case Q4_0: return llama_dist_cpu::q4_0_matmul(x, w, n, norm_weight, eps, gated, residual);
    case Q8_0: return llama_dist_cpu::q8_0_matmul(x, w, n, norm_weight, eps, gated, residual);
  }
  TORCH_CHECK(false, "decode_blocks: unknown weight format ", format);
}

// x [B, 1, dim]; per layer l: weights[4l..4l+3] = wqkv, wo, w13, w2 blocks with their formats and output sizes,
// norms[2l], norms[2l+1] = attention_norm, ffn_norm weights, caches[2l], caches[2l+1] = its keys and values;
// rope [B, 1, head_dim / 2, 2], block_table (the caches' pages), slots [B] (cache rows), pos [B].
at::Tensor decode_blocks(const at::Tensor& x, at::TensorList weights, at::IntArrayRef formats, at::IntArrayRef sizes,
                         at::TensorList norms, at::TensorList caches, const at::Tensor& rope,
                         const at::Tensor& block_table, const at::Tensor& slots, const at::Tensor& pos, int64_t n_rep,
                         double eps) {
  const int64_t layers = static_cast<int64_t>(norms.size()) / 2, B = x.size(0);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_blocks: one token per row, [B, 1, dim]");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 4 * layers && static_cast<int64_t>(formats.size()) == 4 * layers &&
                  static_cast<int64_t>(sizes.size()) == 4 * layers && static_cast<int64_t>(caches.size()) == 2 * layers,
              "decode_blocks: 4 weights, 2 norms and 2 caches per layer");
  const at::Tensor r = rope.reshape({B, -1});
  at::Tensor h = x.reshape({B, -1});
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t w = 4 * l;
    at::Tensor keys = caches[2 * l], values = caches[2 * l + 1];
    const at::Tensor qkv = product(formats[w], h, weights[w], sizes[w], norms[2 * l], eps, false, c10::nullopt);
    const at::Tensor heads = llama_dist_cpu::cpu_decode_attention(qkv, r, keys, values, block_table, slots, pos,
                                                                             n_rep);
    const at::Tensor mid = product(formats[w + 1], heads, weights[w + 1], sizes[w + 1], c10::nullopt, 0., false, h);
    const at::Tensor gate_up = product(formats[w + 2], mid, weights[w + 2], sizes[w + 2], norms[2 * l + 1], eps, false,
                                       c10::nullopt);
    h = product(formats[w + 3], gate_up, weights[w + 3], sizes[w + 3], c10::nullopt, 0., true, mid);
  }
  return h.view_as(x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_dist, m) {
  m.def("decode_blocks(Tensor x, Tensor[] weights, int[] formats, int[] sizes, Tensor[] norms, Tensor(a!)[] caches, "
        "Tensor rope, Tensor block_table, Tensor slots, Tensor pos, int n_rep, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_dist, CPU, m) {
  m.impl("decode_blocks", &decode_blocks);
}
