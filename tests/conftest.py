import pytest

from llama_dist.model.args import ModelArgs

from .helpers import TINY_GQA, random_state_dict, train_sentencepiece, write_meta_checkpoint


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A GQA tiny model written as MP=1 and MP=2 Meta checkpoints with the same weights."""
    root = tmp_path_factory.mktemp("ckpt")
    args = ModelArgs(**TINY_GQA)
    sd = random_state_dict(args, seed=1)
    return {"args": args, "state_dict": sd,
            "mp1": write_meta_checkpoint(root / "mp1", args, sd, mp=1),
            "mp2": write_meta_checkpoint(root / "mp2", args, sd, mp=2)}
