"""A TinyLlama-1.1B-shaped GGUF with random weights, written by the gguf package, for CPU benchmarks beyond SmolLM2
(or Llama-2-7B-shaped, for GPU ones: issue 23's Q4_K_M file against our int4).

    python benchmarks/tinyllama_gguf.py OUT.gguf [--qtype Q4_0|Q4_K_M] [--shape tinyllama|llama-2-7b]
    python benchmarks/gpu_decode.py --model OUT.gguf --hf False --compile False   # then, on a GPU

TinyLlama: 22 layers, dim 2048, 32 heads / 4 kv heads, hidden 5632; Llama-2-7B: 32 layers, dim 4096, 32 heads,
hidden 11008; vocab 32000 (a SentencePiece-style vocabulary of byte tokens and letter pieces). The quantized tensors are random blocks of their GGML type (random codes,
scales chosen so activations stay in range), typed as llama.cpp's quantizer types them: Q4_0 files keep
output.weight in Q6_K; Q4_K_M files are Q4_K with Q6_K for output.weight and for attn_v / ffn_down of the
layers llama.cpp gives more bits (its use_more_bits rule). Norms are float32.
"""
from __future__ import annotations

import argparse
import itertools
import string

import numpy as np

SHAPES = {"tinyllama": dict(n_layers=22, dim=2048, n_heads=32, n_kv_heads=4, hidden=5632, vocab=32000),
          "llama-2-7b": dict(n_layers=32, dim=4096, n_heads=32, n_kv_heads=32, hidden=11008, vocab=32000)}
# bytes per block and weights per block of each GGML type written here
BLOCKS = {"Q4_0": (18, 32), "Q4_K": (144, 256), "Q6_K": (210, 256)}


def vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, 256 byte tokens, then letters and letter pairs/triples with and without the word
    marker, longer pieces scoring higher (so SentencePiece's BPE merges reach them)."""
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,;:!?'\"-()"
    pieces = list(chars) + ["\u2581" + c for c in chars]
    letters = string.ascii_lowercase
    for n in (2, 3):
        for combo in itertools.product(letters, repeat=n):
            pieces += ["".join(combo), "\u2581" + "".join(combo)]
    pieces = pieces[:size - len(tokens)]
    scores = [0.0] * len(tokens) + [-1000.0 + len(p) for p in pieces]
    return tokens + pieces, scores, types + [1] * len(pieces)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers whose attn_v / ffn_down get Q6_K in Q4_K_M."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def random_blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> np.ndarray:
    """rows x cols weights as random blocks: random codes, fp16 scales that give weights of about 0.02."""
    size, per = BLOCKS[qtype]
    blocks = rng.integers(0, 256, (rows, cols // per, size), dtype=np.uint8)

    def scale(about: float) -> np.ndarray:  # one fp16 per block, as its 2 bytes
        return (rng.uniform(0.5, 1.5, (rows, cols // per, 1)) * about).astype(np.float16).view(np.uint8)

    if qtype == "Q4_0":  # d, 16 bytes of nibbles: w = d * (q - 8)
        blocks[..., :2] = scale(0.005)
    elif qtype == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        blocks[..., :4] = np.concatenate([scale(1.5e-4), scale(1.5e-4)], axis=-1)
    else:  # Q6_K: 128 + 64 bytes of codes, 16 int8 scales, d last: w = d * scale * (q - 32)
        blocks[..., 192:208] = rng.integers(1, 40, (rows, cols // per, 16), dtype=np.uint8)
        blocks[..., 208:] = scale(3e-5)
    return blocks.reshape(rows, -1)


def tensors(qtype: str, s: dict, seed: int = 0):
    """(name, array, GGML type name) for every tensor of a model of shape s."""
    rng = np.random.default_rng(seed)
    base = "Q4_0" if qtype == "Q4_0" else "Q4_K"
    head_dim = s["dim"] // s["n_heads"]
    kv = s["n_kv_heads"] * head_dim
    yield "token_embd.weight", random_blocks(rng, base, s["vocab"], s["dim"]), base
    for i in range(s["n_layers"]):
        more = qtype == "Q4_K_M" and use_more_bits(i, s["n_layers"])
        p = f"blk.{i}."
        yield p + "attn_norm.weight", rng.uniform(0.8, 1.2, s["dim"]).astype(np.float32), "F32"
        yield p + "attn_q.weight", random_blocks(rng, base, s["dim"], s["dim"]), base
        yield p + "attn_k.weight", random_blocks(rng, base, kv, s["dim"]), base
        yield p + "attn_v.weight", random_blocks(rng, "Q6_K" if more else base, kv, s["dim"]), "Q6_K" if more else base
        yield p + "attn_output.weight", random_blocks(rng, base, s["dim"], s["dim"]), base
        yield p + "ffn_norm.weight", rng.uniform(0.8, 1.2, s["dim"]).astype(np.float32), "F32"
        yield p + "ffn_gate.weight", random_blocks(rng, base, s["hidden"], s["dim"]), base
        yield p + "ffn_up.weight", random_blocks(rng, base, s["hidden"], s["dim"]), base
        down = "Q6_K" if more else base
        yield p + "ffn_down.weight", random_blocks(rng, down, s["dim"], s["hidden"]), down
    yield "output_norm.weight", rng.uniform(0.8, 1.2, s["dim"]).astype(np.float32), "F32"
    yield "output.weight", random_blocks(rng, "Q6_K", s["vocab"], s["dim"]), "Q6_K"


def write(path: str, qtype: str = "Q4_0", shape: str = "tinyllama") -> str:
    import gguf

    s = SHAPES[shape]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"{shape}-shaped random {qtype}")
    w.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}[qtype])
    w.add_block_count(s["n_layers"])
    w.add_context_length(2048)
    w.add_embedding_length(s["dim"])
    w.add_feed_forward_length(s["hidden"])
    w.add_head_count(s["n_heads"])
    w.add_head_count_kv(s["n_kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(s["dim"] // s["n_heads"])
    tokens, scores, types = vocabulary(s["vocab"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for name, array, kind in tensors(qtype, s):
        raw = None if kind == "F32" else gguf.GGMLQuantizationType[kind]
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--qtype", default="Q4_0", choices=("Q4_0", "Q4_K_M"))
    p.add_argument("--shape", default="tinyllama", choices=tuple(SHAPES))
    a = p.parse_args()
    print(write(a.out, a.qtype, a.shape))


if __name__ == "__main__":
    main()
