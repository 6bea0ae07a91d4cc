"""Our Transformer equals Hugging Face's LlamaForCausalLM on the same random weights (fp32)."""
import pytest
import torch

from llama_dist.checkpoint.hf_names import hf_name, interleaved_to_hf, rotary_permuted
from llama_dist.checkpoint.config import LoadConfig
from llama_dist.checkpoint.loader import load_model
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.distributed.context import init_distributed
from llama_dist.model.args import ModelArgs
from llama_dist.model.transformer import Transformer

from .helpers import TINY_GQA, TINY_MHA, random_state_dict

transformers = pytest.importorskip("transformers")


def hf_model(args: ModelArgs, sd: dict[str, torch.Tensor]):
    rope = {"rope_theta": args.rope_theta}
    if args.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, **args.rope_scaling}
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, max_position_embeddings=args.max_seq_len, tie_word_embeddings=False,
        rope_parameters=rope, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    hf_sd = {hf_name(k): interleaved_to_hf(v, args.head_dim) if rotary_permuted(k) else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def our_model(args: ModelArgs, sd: dict[str, torch.Tensor]) -> Transformer:
    return load_model(StateDictSource(args, sd), init_distributed(), LoadConfig(dtype="float32", n_ctx=64,
                                                                                max_batch_size=2), progress=False)


@pytest.mark.parametrize("shape", [TINY_MHA, dict(TINY_GQA, use_scaled_rope=True)], ids=["mha", "gqa-llama3.1-rope"])
def test_logits_equal_hf(shape):
    args = ModelArgs(**shape, max_seq_len=64)
    sd = random_state_dict(args, seed=3)
    tokens = torch.randint(0, args.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(args, sd)(tokens).logits
    ours = our_model(args, sd)
    full = ours(tokens, 0)
    rel = (full - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, rel
    # Incremental decoding through the KV cache gives the same logits as one full pass.
    ours(tokens[:, :15], 0)
    step = torch.cat([ours(tokens[:, i:i + 1], i) for i in range(15, 23)], dim=1)
    rel_step = (step - expected[:, 15:]).abs().max() / expected.abs().max()
    assert rel_step < 1e-5, rel_step
    assert expected.std() > 0.5  # weights make real, spread-out logits, not near-ties
