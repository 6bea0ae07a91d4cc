"""The Llama class: Meta's generation API (build, text_completion, chat_completion) on any backend.

SPMD with one driver: every rank runs these methods with the same arguments; rank 0 tokenizes
and samples, and broadcasts prompt ids and each chosen token, so ranks can never drift apart.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypedDict

import torch
import torch.nn.functional as F

from ..checkpoint.loader import describe, load_model, open_checkpoint, open_tokenizer, weight_summary
from ..distributed.comm import Communicator
from ..distributed.context import ParallelContext, init_distributed
from ..distributed.env import detect_launch
from ..distributed.fingerprint import check_same_on_all_ranks, checkpoint_fingerprint, code_fingerprint
from ..model.transformer import Slots, Transformer
from ..parallel.pipeline import check_layout, decode_interleaved, parse_split, row_groups, split_layers
from ..tokenizer import Tokenizer
from ..tokenizer.chat import Dialog, encode_dialog
from .sampling import sample

PAD = -1  # never fed to the model: positions past a prompt's end are filled before they are read
STOP_CHECK_EVERY = 8  # tokens past a stop are computed and discarded; checking less often avoids syncs


MIN_ATTENTION_WINDOW = 256  # the shortest cache prefix a compiled step attends over


def attention_window(pos: int, max_seq_len: int) -> int:
    """The cache prefix a compiled step at `pos` attends over: a power of two (at least
    MIN_ATTENTION_WINDOW) holding pos + 1, so a few graphs cover every position and a step reads
    at most twice the cache it needs instead of all of it."""
    window = MIN_ATTENTION_WINDOW
    while window < pos + 1:
        window *= 2
    return min(window, max_seq_len)


def batch_bucket(rows: int, max_batch_size: int) -> int:
    """The batch size a compiled step runs `rows` rows at: a power of two (at most max_batch_size),
    so a server's changing batch needs a few graphs, not one per size."""
    return min(1 << (rows - 1).bit_length(), max_batch_size)


DecodeStep = Callable[..., torch.Tensor]


def make_stage_step(model: Transformer, compile: bool) -> DecodeStep:
    """step(x, pos, slots=None) -> this pipeline stage's output for one token per row (the whole
    model's logits [B, 1, vocab] where one stage holds every layer): x is the tokens [B, 1] on the
    first stage, else the hidden state the stage before produced; sends and receives are the caller's.

    pos: one position for every row (an int) or a list of per-row positions; slots: the cache rows,
    as indices (the server's continuous batching) or a slice of consecutive rows (a pipeline's row
    group; None: rows 0..B-1). Compiled, it attends over a power-of-two window of the cache with a
    mask, and a batch with slot indices is padded to a power-of-two size by repeating its last row (which writes the same key and value to the same cache place
    again; its output is dropped), so few shapes occur: on GPUs a CUDA graph each. Eager, it
    attends over the filled part only."""
    if not compile:
        return lambda x, pos, slots=None: model.stage_forward(
            x, pos if isinstance(pos, int) else torch.tensor(pos, device=x.device), slots)
    on_gpu = model.rope.device.type == "cuda"
    if on_gpu:
        model.comm.enable_fast_all_reduce(model.max_batch_size * model.args.dim, model.act_dtype,
                                          model.rope.device)
    windows = math.ceil(math.log2(max(model.max_seq_len / MIN_ATTENTION_WINDOW, 1))) + 1
    buckets = model.max_batch_size.bit_length() + 1
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, windows * buckets + 2)

    def forward(x: torch.Tensor, positions: torch.Tensor, window: int, slots: Slots) -> torch.Tensor:
        return model.stage_forward(x, positions, slots, length=window)

    # Guards on the model's modules cost ~1.4 ms per call (30 layers' attributes, checked every token)
    # and the model never changes after loading, so they are skipped. Compiled graphs are cached per
    # code object: a code object of this model's own keeps another model from matching its graphs.
    forward.__code__ = forward.__code__.replace()
    # GPUs: static shapes, a CUDA graph per batch bucket and window. CPUs: a graph takes a minute to
    # compile there, so a shape that changes (batch size, window) is recompiled once as dynamic instead.
    step = torch.compile(forward, fullgraph=on_gpu, dynamic=False if on_gpu else None,
                         options={"triton.cudagraphs": on_gpu,  # what mode="reduce-overhead" sets
                                  # CPUs: a C++ wrapper calls the kernels, not Python (SmolLM2: +18% tok/s)
                                  "cpp_wrapper": not on_gpu,
                                  "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def run(x: torch.Tensor, pos: int | list[int], slots: Slots = None) -> torch.Tensor:
        rows, device = x.shape[0], x.device
        if isinstance(pos, int):
            positions, last = torch.full((rows,), pos, device=device), pos
        else:
            positions, last = torch.tensor(pos, device=device), max(pos)
        window = attention_window(last, model.max_seq_len)
        if not isinstance(slots, torch.Tensor):  # all rows, or consecutive ones: shapes repeat anyway
            return step(x, positions, window, slots)
        pad = batch_bucket(rows, model.max_batch_size) - rows
        if pad:
            x, positions, slots = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (x, positions, slots))
        return step(x, positions, window, slots)[:rows]

    return run


def make_decode_step(model: Transformer, compile: bool = False, step: DecodeStep | None = None) -> DecodeStep:
    """decode(tokens [B, 1], pos, slots=None) -> logits [B, 1, vocab] on every rank, one token per row
    (arguments as make_stage_step's). On a pipeline the batch goes through the stages in turn, each
    stage's share by the stage step (`step`, else a new one)."""
    step = step or make_stage_step(model, compile)
    stage = model.stage
    if not stage.pipelined:
        return step

    def decode(tokens: torch.Tensor, pos: int | list[int], slots: torch.Tensor | None = None) -> torch.Tensor:
        shape = (tokens.shape[0], 1, model.args.dim)
        x = tokens if stage.is_first else stage.receive(shape, model.act_dtype, tokens.device)
        out = step(x, pos, slots)
        if not stage.is_last:
            stage.send(out).wait()
        return stage.share_logits(out if stage.is_last else None, (*tokens.shape, model.args.vocab_size),
                                  tokens.device)

    return decode


@dataclass
class _Batch:
    """The rows being generated, the same on every rank: prompts, then the driver's choices."""

    tokens: torch.Tensor  # [rows, total_len]: prompt ids, chosen ids, PAD beyond
    is_prompt: torch.Tensor
    stopped: torch.Tensor  # [rows]: a stop token was chosen
    stop_ids: torch.Tensor
    comm: Communicator

    def accept(self, rows: slice, pos: int, chosen: torch.Tensor) -> None:
        """Rank 0's choice for these rows at `pos`, on every rank; where a prompt is still going on, its token stays."""
        chosen = self.comm.broadcast(chosen, src=0)
        prompt = self.is_prompt[rows, pos]
        self.tokens[rows, pos] = torch.where(prompt, self.tokens[rows, pos], chosen)
        self.stopped[rows] |= ~prompt & torch.isin(self.tokens[rows, pos], self.stop_ids)

    def finished(self, rows: slice) -> bool:
        return bool(self.stopped[rows].all())


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]
    logprobs: list[float]


class ChatPrediction(TypedDict, total=False):
    generation: dict
    tokens: list[str]
    logprobs: list[float]


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, ctx: ParallelContext, seed: int = 1,
                 compile: bool = False):
        self.model, self.tokenizer, self.ctx = model, tokenizer, ctx
        self.generator = torch.Generator(device=ctx.device).manual_seed(seed)
        self.stage_step = make_stage_step(model, compile)
        self.decode = make_decode_step(model, step=self.stage_step)

    @staticmethod
    def build(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None, max_seq_len: int = 512, max_batch_size: int = 8,
              backend: str = "auto", device: str | None = None, dtype: str | torch.dtype | None = None,
              seed: int = 1, ctx: ParallelContext | None = None, quantize: str = "auto",
              group_size: int = 32, compile: bool = False, pp: int = 1,
              pp_split: str | list[int] | None = None, micro_batches: int | None = None) -> "Llama":
        """Validate everything cheap first (paths, shapes, world size, tokenizer), then load this rank's shard.

        `ckpt_dir`: a Meta folder, an HF folder or a .gguf file; `tokenizer_path`: optional when
        the model carries its tokenizer (GGUF, HF) or has tokenizer.model beside it (Meta).
        `quantize`: "auto" keeps stored quantization (GGUF Q4 blocks, quantized checkpoints),
        "none" loads dense, "int8"/"int4" quantize at load time (int4 in groups of `group_size`).
        `compile`: torch.compile the one-token decode step (CUDA graphs on GPUs); the first call compiles.
        `pp`: pipeline stages (world = TP x PP ranks); `pp_split`: layers per stage ("10,20"; default
        even); `micro_batches`: parts a batch is cut into to keep the stages busy (default pp).
        """
        source = open_checkpoint(ckpt_dir)
        tokenizer = open_tokenizer(source, tokenizer_path)
        pp = ctx.pp_size if ctx else pp
        pp_split = parse_split(pp_split)
        source.args.check_world_size(check_layout(ctx.world_size if ctx else detect_launch().world_size, pp))
        split_layers(source.args.n_layers, pp, pp_split)
        ctx = ctx or init_distributed(backend, device, pp=pp)
        check_same_on_all_ranks(ctx, code_fingerprint(), "llama-dist code")
        check_same_on_all_ranks(ctx, checkpoint_fingerprint(source.path, source.format, source.args.to_params_json()),
                                "checkpoint")
        start = time.perf_counter()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model = load_model(source, ctx, dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                           quantize=quantize, group_size=group_size, pp_split=pp_split, micro_batches=micro_batches)
        if ctx.is_driver:
            layout = f"TP {ctx.tp_size} x PP {ctx.pp_size}, " if ctx.pp_size > 1 else ""
            print(f"Loaded {describe(source)} {ckpt_dir} ({tokenizer.kind} tokenizer) on {ctx.world_size} rank(s) "
                  f"({layout}"
                  f"{ctx.backend}, {ctx.device}, {model.act_dtype}{weight_summary(model)}) in {time.perf_counter() - start:.2f} s")
        return Llama(model, tokenizer, ctx, seed, compile)

    @property
    def is_driver(self) -> bool:
        return self.ctx.is_driver

    @torch.inference_mode()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False
                 ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Batched generation from prompts of different lengths; each stops at a stop token or max_gen_len."""
        prompt_tokens = self.ctx.comm.broadcast_object(prompt_tokens)
        model, device = self.model, self.ctx.device
        bsz = len(prompt_tokens)
        if not 0 < bsz <= model.max_batch_size:
            raise ValueError(f"{bsz} prompts given; this model was built for 1 to {model.max_batch_size} "
                             "(raise max_batch_size).")
        lengths = [len(p) for p in prompt_tokens]
        if min(lengths) == 0:
            raise ValueError("An empty prompt cannot be completed: give at least one token.")
        if max(lengths) >= model.max_seq_len:
            raise ValueError(f"A prompt of {max(lengths)} tokens does not fit the context of {model.max_seq_len} "
                             "tokens with room to generate; shorten it or raise max_seq_len.")
        total_len = min(model.max_seq_len, max_gen_len + max(lengths))
        tokens = torch.full((bsz, total_len), PAD, dtype=torch.long, device=device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        batch = _Batch(tokens, tokens != PAD, torch.zeros(bsz, dtype=torch.bool, device=device),
                       torch.tensor(sorted(self.tokenizer.stop_ids), device=device), self.ctx.comm)
        token_logprobs = torch.zeros(bsz, total_len, device=device) if logprobs else None
        # pipeline stages take turns on groups of rows (after the prompts' common part, in one pass)
        interleave = model.stage.pipelined and bsz > 1 and not logprobs
        every_row = slice(None)
        prev_pos = 0
        for cur_pos in range(min(lengths), min(lengths) + 1 if interleave else total_len):
            if cur_pos - prev_pos == 1 and not logprobs:  # one token per row: the (compiled) decode step
                logits = self.decode(tokens[:, prev_pos:cur_pos], prev_pos)
            else:
                logits = model(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
            batch.accept(every_row, cur_pos, sample(logits[:, -1], temperature, top_p, self.generator))
            if logprobs:
                token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none", ignore_index=PAD)
            prev_pos = cur_pos
            if cur_pos % STOP_CHECK_EVERY == 0 and batch.finished(every_row):  # a host sync: not every token
                break
        ends = [prev_pos + 1] * bsz  # per row: one past its last filled position
        if interleave and prev_pos + 1 < total_len and not batch.finished(every_row):
            self._decode_interleaved(batch, prev_pos, total_len, ends, temperature, top_p)
        out_tokens, out_logprobs = [], []
        for i, n in enumerate(lengths):
            start = 0 if echo else n
            row = tokens[i, start:min(ends[i], n + max_gen_len)].tolist()
            cut = next((j for j, t in enumerate(row) if j + start >= n and t in self.tokenizer.stop_ids), len(row))
            out_tokens.append(row[:cut])
            if logprobs:
                out_logprobs.append(token_logprobs[i, start:start + cut].tolist())
        return out_tokens, (out_logprobs if logprobs else None)

    def _decode_interleaved(self, batch: "_Batch", pos: int, total_len: int, ends: list[int],
                            temperature: float, top_p: float) -> None:
        """The rest of a batch on a pipeline: one group of rows per stage, each a step behind the last."""
        device = batch.tokens.device
        groups = row_groups(len(ends), self.model.stage.count)

        def step_done(group: int, p: int, logits: torch.Tensor | None) -> bool:
            rows = groups[group]
            chosen = (sample(logits[:, -1], temperature, top_p, self.generator) if logits is not None
                      else torch.empty(rows.stop - rows.start, dtype=torch.long, device=device))
            batch.accept(rows, p + 1, chosen)
            ends[rows] = [p + 2] * (rows.stop - rows.start)
            return p + 2 < total_len and not ((p + 1) % STOP_CHECK_EVERY == 0 and batch.finished(rows))

        decode_interleaved(self.model, self.stage_step, groups, pos, lambda g, p: batch.tokens[groups[g], p:p + 1],
                           step_done)

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False,
                        echo: bool = False) -> list[CompletionPrediction]:
        max_gen_len = max_gen_len or self.model.max_seq_len - 1
        ids = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts] if self.is_driver else None
        tokens, lps = self.generate(ids, max_gen_len, temperature, top_p, logprobs, echo)
        return [self._prediction({"generation": self.tokenizer.decode(t)}, t, lps[i] if logprobs else None)
                for i, t in enumerate(tokens)]

    def chat_completion(self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False,
                        chat_template: str | None = None) -> list[ChatPrediction]:
        """Answer each dialog in the model's chat format (its own template, or one named in TEMPLATES)."""
        max_gen_len = max_gen_len or self.model.max_seq_len - 1
        ids = [encode_dialog(d, self.tokenizer, chat_template) for d in dialogs] if self.is_driver else None
        tokens, lps = self.generate(ids, max_gen_len, temperature, top_p, logprobs)
        return [self._prediction({"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}},
                                 t, lps[i] if logprobs else None) for i, t in enumerate(tokens)]

    def _prediction(self, base: dict, tokens: list[int], logprobs: list[float] | None) -> dict:
        if logprobs is not None:
            base.update(tokens=[self.tokenizer.decode([t]) for t in tokens], logprobs=logprobs)
        return base
