"""The Llama class: Meta's generation API (build, text_completion, chat_completion) on any backend.

SPMD with one driver: every rank runs these methods with the same arguments; rank 0 tokenizes
and samples, and broadcasts prompt ids and each chosen token, so ranks can never drift apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F

from ..checkpoint.config import LoadConfig
from ..checkpoint.loader import describe, load_model, open_checkpoint, weight_summary
from ..checkpoint.source import CheckpointSource
from ..distributed.comm import Communicator
from ..distributed.context import ParallelContext, init_distributed
from ..distributed.env import detect_launch
from ..distributed.fingerprint import check_same_on_all_ranks, checkpoint_fingerprint, code_fingerprint
from ..distributed.layout import ParallelConfig, check_layout, split_layers
from ..kernels import Kernels, choose_kernels, install, invariant
from ..runner import Runner, pipeline_stage, row_groups
from ..tokenizer import Tokenizer, open_tokenizer
from ..tokenizer.chat import Dialog, encode_dialog
from .sampling import SamplingParams, sample

PAD = -1  # never fed to the model: positions past a prompt's end are filled before they are read
STOP_CHECK_EVERY = 8  # tokens past a stop are computed and discarded; checking less often avoids syncs


def make_configs(model: str, n_ctx: int, max_batch_size: int, **options: Any) -> tuple[LoadConfig, ParallelConfig]:
    """The load and parallel configs from a model, its context and batch size, and any of their other fields
    by name (how Llama.build and the command line take them)."""
    load_names = {f.name for f in fields(LoadConfig)} - {"model", "n_ctx", "max_batch_size"}
    parallel_names = {f.name for f in fields(ParallelConfig)}
    unknown = set(options) - load_names - parallel_names
    if unknown:
        raise TypeError(f"Unknown option(s) {', '.join(sorted(unknown))}; the options are "
                        f"{', '.join(sorted(load_names | parallel_names))}.")
    load = LoadConfig(model=model, n_ctx=n_ctx, max_batch_size=max_batch_size,
                      **{k: v for k, v in options.items() if k in load_names})
    return load, ParallelConfig(**{k: v for k, v in options.items() if k in parallel_names})


def load_runner(source: CheckpointSource, ctx: ParallelContext, load: LoadConfig,
                parallel: ParallelConfig = ParallelConfig(), kernels: Kernels | None = None,
                progress: bool = True) -> Runner:
    """This rank's stage of the model, loaded, given its kernels (default: the fastest the device has,
    kernels.choose_kernels) and wrapped in the runner that moves it."""
    stage = pipeline_stage(ctx, source.args.n_layers, parallel)
    model = load_model(source, ctx, load, stage.layers, progress=progress)
    kernels = kernels or choose_kernels(ctx.device, batch_invariant=load.batch_invariant)
    if load.batch_invariant and not kernels.batch_invariant:
        invariant.check_without_kernels(model, ctx.device)
    install(model, kernels)
    return Runner(model, stage, load.compile, fast_all_reduce=kernels.symm_mem, cuda_graphs=load.cuda_graphs,
                  batch_invariant=kernels.batch_invariant)


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
    def __init__(self, runner: Runner, tokenizer: Tokenizer, ctx: ParallelContext, seed: int = 1):
        self.runner, self.model, self.tokenizer, self.ctx = runner, runner.model, tokenizer, ctx
        self.generator = torch.Generator(device=ctx.device).manual_seed(seed)

    @staticmethod
    def build(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None, max_seq_len: int = 512,
              max_batch_size: int = 8, seed: int = 1, ctx: ParallelContext | None = None, **options: Any) -> "Llama":
        """Meta's arguments, plus any field of LoadConfig (dtype, quantize, group_size, compile) or
        ParallelConfig (backend, device, pp, pp_split, micro_batches) by name; see from_config.

        `ckpt_dir`: a Meta folder, an HF folder, a .gguf file or `smollm2`; `tokenizer_path`: optional when
        the model carries its tokenizer (GGUF, HF) or has tokenizer.model beside it (Meta);
        `max_seq_len`: the context length (n_ctx); `ctx`: an initialised ParallelContext to reuse."""
        tokenizer = None if tokenizer_path is None else str(tokenizer_path)
        load, parallel = make_configs(str(ckpt_dir), max_seq_len, max_batch_size, tokenizer=tokenizer, **options)
        return Llama.from_config(load, parallel, ctx=ctx, seed=seed)

    @staticmethod
    def from_config(load: LoadConfig, parallel: ParallelConfig = ParallelConfig(), ctx: ParallelContext | None = None,
                    seed: int = 1, kernels: Kernels | None = None) -> "Llama":
        """Validate everything cheap first (paths, shapes, world size, tokenizer), then load this rank's shard.
        kernels: the fast kernels to install (default: the fastest this device has)."""
        source = open_checkpoint(load.model)
        tokenizer = open_tokenizer(source, load.tokenizer)
        pp = ctx.pp_size if ctx else parallel.pp
        source.args.check_world_size(check_layout(ctx.world_size if ctx else detect_launch().world_size, pp))
        split_layers(source.args.n_layers, pp, parallel.pp_split)
        ctx = ctx or init_distributed(parallel.backend, parallel.device, pp=pp)
        check_same_on_all_ranks(ctx, code_fingerprint(), "llama-dist code")
        check_same_on_all_ranks(ctx, checkpoint_fingerprint(source.path, source.format, source.args.to_params_json()),
                                "checkpoint")
        start = time.perf_counter()
        runner = load_runner(source, ctx, load, parallel, kernels)
        model = runner.model
        if ctx.is_driver:
            layout = f"TP {ctx.tp_size} x PP {ctx.pp_size}, " if ctx.pp_size > 1 else ""
            print(f"Loaded {describe(source)} {load.model} ({tokenizer.kind} tokenizer) on {ctx.world_size} rank(s) "
                  f"({layout}{ctx.backend}, {ctx.device}, {model.act_dtype}{weight_summary(model)}) in "
                  f"{time.perf_counter() - start:.2f} s")
        return Llama(runner, tokenizer, ctx, seed)

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
        if max(lengths) >= model.n_ctx:
            raise ValueError(f"A prompt of {max(lengths)} tokens does not fit the context of {model.n_ctx} "
                             "tokens with room to generate; shorten it or raise max_seq_len (n_ctx).")
        total_len = min(model.n_ctx, max_gen_len + max(lengths))
        model.own_blocks()  # rows 0..bsz-1, each its own blocks (a serving engine may have shared them out)
        tokens = torch.full((bsz, total_len), PAD, dtype=torch.long, device=device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        params = SamplingParams.meta(temperature, top_p)
        batch = _Batch(tokens, tokens != PAD, torch.zeros(bsz, dtype=torch.bool, device=device),
                       torch.tensor(sorted(self.tokenizer.stop_ids), device=device), self.ctx.comm)
        token_logprobs = torch.zeros(bsz, total_len, device=device) if logprobs else None
        # pipeline stages take turns on groups of rows (after the prompts' common part, in one pass)
        interleave = self.runner.stage.pipelined and bsz > 1 and not logprobs
        every_row = slice(None)
        prev_pos = 0
        for cur_pos in range(min(lengths), min(lengths) + 1 if interleave else total_len):
            if cur_pos - prev_pos == 1 and not logprobs:  # one token per row: the (compiled) decode step
                logits = self.runner.decode(tokens[:, prev_pos:cur_pos], prev_pos)
            else:
                logits = self.runner.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
            batch.accept(every_row, cur_pos, sample(logits[:, -1], params, self.generator))
            if logprobs:
                token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none", ignore_index=PAD)
            prev_pos = cur_pos
            if cur_pos % STOP_CHECK_EVERY == 0 and batch.finished(every_row):  # a host sync: not every token
                break
        ends = [prev_pos + 1] * bsz  # per row: one past its last filled position
        if interleave and prev_pos + 1 < total_len and not batch.finished(every_row):
            self._decode_interleaved(batch, prev_pos, total_len, ends, params)
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
                            params: SamplingParams) -> None:
        """The rest of a batch on a pipeline: one group of rows per stage, each a step behind the last."""
        device = batch.tokens.device
        groups = row_groups(len(ends), self.runner.stage.count)

        def step_done(group: int, p: int, logits: torch.Tensor | None) -> bool:
            rows = groups[group]
            chosen = (sample(logits[:, -1], params, self.generator) if logits is not None
                      else torch.empty(rows.stop - rows.start, dtype=torch.long, device=device))
            batch.accept(rows, p + 1, chosen)
            ends[rows] = [p + 2] * (rows.stop - rows.start)
            return p + 2 < total_len and not ((p + 1) % STOP_CHECK_EVERY == 0 and batch.finished(rows))

        self.runner.decode_interleaved(groups, pos, lambda g, p: batch.tokens[groups[g], p:p + 1], step_done)

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False,
                        echo: bool = False) -> list[CompletionPrediction]:
        max_gen_len = max_gen_len or self.model.n_ctx - 1
        ids = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts] if self.is_driver else None
        tokens, lps = self.generate(ids, max_gen_len, temperature, top_p, logprobs, echo)
        return [self._prediction({"generation": self.tokenizer.decode(t)}, t, lps[i] if logprobs else None)
                for i, t in enumerate(tokens)]

    def chat_completion(self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False,
                        chat_template: str | None = None) -> list[ChatPrediction]:
        """Answer each dialog in the model's chat format (its own template, or one named in TEMPLATES)."""
        max_gen_len = max_gen_len or self.model.n_ctx - 1
        ids = [encode_dialog(d, self.tokenizer, chat_template) for d in dialogs] if self.is_driver else None
        tokens, lps = self.generate(ids, max_gen_len, temperature, top_p, logprobs)
        return [self._prediction({"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}},
                                 t, lps[i] if logprobs else None) for i, t in enumerate(tokens)]

    def _prediction(self, base: dict, tokens: list[int], logprobs: list[float] | None) -> dict:
        if logprobs is not None:
            base.update(tokens=[self.tokenizer.decode([t]) for t in tokens], logprobs=logprobs)
        return base
