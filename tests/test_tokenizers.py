"""Tokenizers: GGUF BPE equals llama.cpp on the real model; SentencePiece/tiktoken/HF round trips; streaming."""
import base64
import json
from pathlib import Path

import pytest

from llama_dist.checkpoint.bundled import bundled_model_path
from llama_dist.tokenizer import load_tokenizer
from llama_dist.tokenizer.stream import TextStream

from .fixtures.strings import TOKENIZER_STRINGS

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "llamacpp_smollm2.json").read_text())


@pytest.fixture(scope="module")
def smollm_tokenizer():
    return load_tokenizer(bundled_model_path())


def test_fixture_covers_all_strings():
    assert set(FIXTURE["tokenize"]) == set(TOKENIZER_STRINGS) and len(TOKENIZER_STRINGS) >= 30


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_gguf_bpe_matches_llamacpp(smollm_tokenizer, text):
    ids = smollm_tokenizer.encode(text, bos=False)
    assert ids == FIXTURE["tokenize"][text]
    assert smollm_tokenizer.decode(ids) == text


def test_smollm_flags(smollm_tokenizer):
    t = smollm_tokenizer
    assert (t.kind, t.bos_id, t.eos_id, t.add_bos, t.n_words) == ("bpe", 1, 2, False, 49152)
    assert t.encode("hi", bos=True) == t.encode("hi", bos=False)  # add_bos_token is false in this GGUF
    assert "<|im_start|>" in t.chat_template


def test_stream_decoding_holds_back_split_characters(smollm_tokenizer):
    text = "héllo 🎉 中文 done"
    ids = smollm_tokenizer.encode(text, bos=False)
    stream = TextStream(smollm_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # it really streams


def test_stream_decoding_of_a_long_text_equals_decoding_it_whole(smollm_tokenizer, sp_tokenizer):
    """Each push decodes only the last few tokens (its cost does not grow with the answer); the text streamed is
    the text decoded whole, spacing rules and split characters included, with either kind of tokenizer."""
    text = ("Le café était naïf 🎉 et 中文 aussi.  Two  spaces, a\nnew line, and ünïcödé everywhere! " * 8).strip()
    for tokenizer in (smollm_tokenizer, load_tokenizer(sp_tokenizer)):
        ids = tokenizer.encode(text, bos=False)
        stream = TextStream(tokenizer)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert streamed == tokenizer.decode(ids)


def test_sentencepiece_roundtrip_and_specials(sp_tokenizer):
    tok = load_tokenizer(sp_tokenizer)
    assert tok.kind == "sentencepiece" and tok.add_bos
    ids = tok.encode("I believe the meaning of life is", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "I believe the meaning of life is"
    # Control tokens written in text (as rendered chat templates do) become their ids.
    assert tok.encode("<s>[INST] hi [/INST]", bos=False)[0] == tok.bos_id
    assert tok.decode(tok.encode("naïve 中 ✓", bos=False)) == "naïve 中 ✓"  # byte fallback


def test_sentencepiece_save_reload_via_folder(sp_tokenizer, tmp_path):
    tok = load_tokenizer(sp_tokenizer)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "Translate English to French: cheese => fromage"
    assert again.encode(text) == tok.encode(text)


def test_tiktoken_llama3_format(tmp_path):
    """A Llama 3 style tokenizer.model (base64 + rank lines): bytes, a few merges, then 256 specials."""
    ranks = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b" wor", b" world"]
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    tok = load_tokenizer(path)
    assert tok.kind == "tiktoken" and tok.n_words == len(ranks) + 256
    ids = tok.encode("hello world", bos=True)
    assert ids == [tok.bos_id, 259, 262]
    assert tok.decode(ids[1:]) == "hello world"
    eot = tok.encode("<|eot_id|>", bos=False)
    assert eot == [len(ranks) + 9] and eot[0] in tok.stop_ids


def test_hf_tokenizer_json_folder(smollm_tokenizer, tmp_path):
    """An HF folder (tokenizer.json + tokenizer_config.json) tokenizes like the GGUF it was written from."""
    smollm_tokenizer.save(tmp_path)
    hf = load_tokenizer(tmp_path)
    assert (hf.kind, hf.bos_id, hf.eos_id, hf.add_bos) == ("bpe", 1, 2, False)
    for text in TOKENIZER_STRINGS:
        assert hf.encode(text, bos=False) == FIXTURE["tokenize"][text]
    assert hf.chat_template == smollm_tokenizer.chat_template
