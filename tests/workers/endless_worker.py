"""One rank generating without end (until killed): a target for failure tests."""
import sys
from pathlib import Path

from llama_dist import Llama

ckpt, tokenizer, marker_dir = sys.argv[1:4]
llama = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=1, backend="gloo")
step = 0
while True:
    llama.generate([[1, 5, 9]], max_gen_len=32, temperature=0.0)
    step += 1
    if step == 2:
        Path(marker_dir, f"generating.{llama.ctx.rank}").touch()
