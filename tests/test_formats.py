"""Every input format loads into the same model: GGUF (SentencePiece vocab), HF safetensors, Meta; bad files fail clearly."""
import json

import numpy as np
import pytest
import torch

from llama_dist import Llama
from llama_dist.checkpoint.gguf import gguf_name
from llama_dist.checkpoint.hf import save_hf_checkpoint
from llama_dist.checkpoint.loader import open_checkpoint
from llama_dist.checkpoint.source import StateDictSource
from llama_dist.checkpoint.bundled import bundled_model_path
from llama_dist.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")

PROMPT = "I believe the meaning of life is"


def write_tiny_gguf(path, args, state_dict, sp_model_path, arch="llama"):
    """A GGUF written by the gguf package itself (an independent writer), SentencePiece vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(sp_model_path, "rb").read())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layers)
    w.add_context_length(256)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for name, tensor in state_dict.items():
        w.add_tensor(gguf_name(name), tensor.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, sp_tokenizer):
    llama = Llama.build(tiny_checkpoints["mp1"], sp_tokenizer, max_seq_len=64, max_batch_size=1)
    ids = llama.tokenizer.encode(PROMPT)
    return {"ids": ids, "logits": llama.model(torch.tensor([ids]), 0)}


def test_gguf_with_sentencepiece_vocab(tiny_checkpoints, sp_tokenizer, reference, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_checkpoints["args"], tiny_checkpoints["state_dict"],
                           sp_tokenizer)
    llama = Llama.build(path, max_seq_len=64, max_batch_size=1)  # tokenizer from the GGUF itself
    assert llama.tokenizer.kind == "sentencepiece"
    original = load_tokenizer(sp_tokenizer)
    for text in [PROMPT, "  spaces  and\nnewlines", "naïve 中 ✓ 42", "cheese => fromage"]:
        assert llama.tokenizer.encode(text) == original.encode(text), text
        assert llama.tokenizer.decode(llama.tokenizer.encode(text)) == text
    assert (llama.model(torch.tensor([reference["ids"]]), 0) - reference["logits"]).abs().max() < 1e-5


def test_hf_folder_loads_and_matches_transformers(tiny_checkpoints, sp_tokenizer, reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    args, sd = tiny_checkpoints["args"], tiny_checkpoints["state_dict"]
    folder = save_hf_checkpoint(StateDictSource(args, sd), tmp_path / "hf", max_shard_bytes=200_000)
    assert (folder / "model.safetensors.index.json").exists()  # sharded with an index
    load_tokenizer(sp_tokenizer).save(folder)
    llama = Llama.build(folder, max_seq_len=64, max_batch_size=1)
    ids = torch.tensor([reference["ids"]])
    assert (llama.model(ids, 0) - reference["logits"]).abs().max() < 1e-5
    # transformers reads what we wrote and computes the same logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(ids).logits
    assert (expected - reference["logits"]).abs().max() / expected.abs().max() < 1e-5


def test_gguf_of_another_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        open_checkpoint(tmp_path / "gpt2.gguf")


def test_truncated_gguf(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(bundled_model_path(), "rb") as f:
        cut.write_bytes(f.read(40_000_000))
    with pytest.raises(ValueError, match="truncated"):
        open_checkpoint(cut)
    cut.write_bytes(cut.read_bytes()[:100_000])  # inside the header (the vocabulary)
    with pytest.raises(ValueError, match="truncated"):
        open_checkpoint(cut)


def test_hf_folder_without_config(tiny_checkpoints, tmp_path):
    args, sd = tiny_checkpoints["args"], tiny_checkpoints["state_dict"]
    folder = save_hf_checkpoint(StateDictSource(args, sd), tmp_path / "hf")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        open_checkpoint(folder)


def test_tokenizer_that_does_not_fit_the_model(tiny_checkpoints):
    with pytest.raises(ValueError, match="49152 tokens but the model's vocabulary has 384"):
        Llama.build(tiny_checkpoints["mp1"], bundled_model_path(), max_seq_len=64, max_batch_size=1)


def test_not_a_model_at_all(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        open_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        open_checkpoint(tmp_path)


def test_info_and_convert_cli(tmp_path, capsys):
    from llama_dist.cli import info

    info("smollm2")
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "GGUF file" and out["heads"] == 9 and out["kv_heads"] == 3
    assert out["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert out["tokenizer"] == "bpe" and out["chat_template"] and out["tensor_parallel_sizes"] == [1, 3]
