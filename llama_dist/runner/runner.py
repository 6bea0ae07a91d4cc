"""The runner: a model stage and how it meets the other stages. Generation and serving talk to it alone.

One stage (every layer on this rank's tensor-parallel group) runs the model directly. On a pipeline
the runner owns the traffic: it feeds each stage what the one before produced, cuts batches and
long prompts into micro-batches so the stages work at once, interleaves groups of rows while
decoding, and shares the last stage's logits.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..model.transformer import Packed, Transformer, run_ends, to_device
from .graphs import GraphedPrompts, GraphedStep, cuda_graph_recorder
from .pipeline import PipelineStage
from .step import Step, make_step

MIN_MICRO_BATCH_TOKENS = 64  # below this, a pipeline part is too small to be worth another pass over a stage

StepDone = Callable[[int, int, "torch.Tensor | None"], bool]


class Runner:
    def __init__(self, model: Transformer, stage: PipelineStage, compile: bool = False,
                 fast_all_reduce: bool = False, cuda_graphs: bool = False, batch_invariant: bool = False):
        """compile: the one-token step compiled (CUDA graphs on GPUs); fast_all_reduce: its all-reduces by
        the communicator's faster route where it has one; cuda_graphs: on GPUs without compile, the step (and,
        where the kernels allow, the packed prompt pass) replayed from CUDA graphs captured now; batch_invariant:
        the model has kernels whose rows do not depend on their batch (kernels/invariant.py), which its callers
        keep by not mixing decode rows into prompt passes."""
        self.model, self.stage, self.batch_invariant = model, stage, batch_invariant
        graphed = cuda_graphs and not compile and model.device.type == "cuda"
        record = cuda_graph_recorder() if graphed else None  # one memory pool: the graphs never run at once
        self.step: Step = GraphedStep(model, record) if graphed else make_step(model, compile, fast_all_reduce)
        self.prompt_graphs = GraphedPrompts(model, record) if graphed and GraphedPrompts.supported(model) else None
        # Each cache row's next token where the device chose it (the serving engine writes it): a token id of -1
        # given to prefill() or resolve() stands for it, so a step can be launched before the host has read the
        # tokens the step before chose.
        self.chosen = torch.zeros(model.max_batch_size, dtype=torch.long, device=model.device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, last_only: bool = False,
                slots: torch.Tensor | None = None, length: int | None = None, hidden: bool = False) -> torch.Tensor:
        """Logits (float32, full vocabulary, on every rank) for `tokens` [B, S] placed at start_pos.., or the
        final normed hidden state with hidden=True (arguments as Transformer.forward's). Every rank calls it
        with the same tokens."""
        if not self.stage.pipelined:
            return self.model(tokens, start_pos, slots, length, last_only, hidden)
        return self._micro_batched(tokens, start_pos, last_only, slots, length, hidden)

    def resolve(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """tokens with each -1 replaced by the token the device chose for its cache row (rows: one per token)."""
        return torch.where(tokens < 0, self.chosen[rows], tokens)

    def prefill(self, chunks: list[tuple[int, int, list[int]]], chosen: bool = False) -> list[torch.Tensor | None]:
        """Read chunks of prompts, each (cache row, start position, token ids), into their cache rows; returns the
        logits [vocab] of each chunk's last token, or None for a chunk the next one continues (the same row's
        next positions: a long prompt read in several chunks at once). One pass for all of them where one stage
        holds every layer (packed side by side: each chunk's arithmetic is what a pass of its own would do;
        replayed from a graph where one holds it), one pass per chunk through a pipeline's stages.
        chosen: some token ids are -1, each its row's token in `self.chosen` (one stage only)."""
        device = self.device
        if self.stage.pipelined:
            if chosen:
                raise ValueError("A pipeline reads prompts of known tokens only.")
            return [self.forward(torch.tensor([ids], device=device), start, last_only=True,
                                 slots=torch.tensor([slot], device=device))[0, -1] for slot, start, ids in chunks]
        slots, starts, ids = zip(*chunks)
        lengths = tuple(map(len, ids))
        ends = run_ends(slots, starts, lengths)
        if self.prompt_pass_graphed(sum(lengths), len(ends)):
            logits = self.prompt_graphs(slots, starts, list(ids), self.resolve if chosen else None)
        else:
            packed = Packed.of(slots, starts, lengths, device)
            tokens = to_device([[t for part in ids for t in part]], device)
            if chosen:
                tokens = self.resolve(tokens, packed.rows)
            logits = self.model(tokens, 0, packed, last_only=True)[0]
        out: list[torch.Tensor | None] = [None] * len(chunks)
        for end, row in zip(ends, logits):
            out[end] = row
        return out

    def prompt_pass_graphed(self, n_tokens: int, n_runs: int) -> bool:
        """Whether prefill() of this many tokens in this many runs replays one graph (so decode rows, as runs of
        one token, can join a step's prompt pass for little more than the pass's own time)."""
        return self.prompt_graphs is not None and self.prompt_graphs.holds(n_tokens, n_runs)

    def decode(self, tokens: torch.Tensor, pos: int | list[int], slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, 1, vocab] on every rank for one token per row [B, 1] at pos (an int, or one per row), by
        the (compiled) step; on a pipeline the batch goes through the stages in turn."""
        stage, model = self.stage, self.model
        if not stage.pipelined:
            return self.step(tokens, pos, slots)
        shape = (tokens.shape[0], 1, model.args.dim)
        x = tokens if stage.is_first else stage.receive(shape, model.act_dtype, tokens.device)
        out = self.step(x, pos, slots)
        if not stage.is_last:
            stage.send(out).wait()
        return stage.share_logits(out if stage.is_last else None, (*tokens.shape, model.args.vocab_size),
                                  tokens.device)

    def _micro_batched(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, last_only: bool,
                       slots: torch.Tensor | None, length: int | None, hidden: bool) -> torch.Tensor:
        """The batch in micro-batches: while stage s works on micro-batch m, stage s-1 works on m+1.

        A micro-batch is a group of rows or, for fewer rows than micro-batches (one long prompt), a
        chunk of the sequence: chunk c attends to chunks before it, which this stage has already
        cached. Too few tokens per part is slower (each part reads the stage's weights again), so
        parts hold at least MIN_MICRO_BATCH_TOKENS tokens: decode steps of small batches run whole.
        """
        stage, model, (bsz, seqlen), device = self.stage, self.model, tokens.shape, tokens.device
        rows = slots if slots is not None else torch.arange(bsz, device=device)
        starts = torch.as_tensor(start_pos, device=device).expand(bsz)
        if length is None:
            length = int(starts.max()) + seqlen
        n_parts = max(1, min(stage.micro_batches, bsz * seqlen // MIN_MICRO_BATCH_TOKENS))
        by_rows = bsz >= n_parts
        if by_rows:  # (row indices, sequence slice) per part
            parts = [(idx, slice(0, seqlen)) for idx in torch.arange(bsz, device=device).tensor_split(n_parts)]
        else:
            cuts = torch.arange(seqlen).tensor_split(min(n_parts, seqlen))  # never an empty chunk
            parts = [(torch.arange(bsz, device=device), slice(int(c[0]), int(c[-1]) + 1)) for c in cuts]
        logits, sending = [], []
        for idx, cols in parts:
            x = tokens[idx][:, cols] if stage.is_first else stage.receive(
                (len(idx), cols.stop - cols.start, model.args.dim), model.act_dtype, device)
            out = model(x, starts[idx] + cols.start, rows[idx], length, last_only, hidden)
            if not stage.is_last:
                sending.append(stage.send(out))
            elif by_rows or not last_only or cols == parts[-1][1]:  # last_only over chunks: the final one
                logits.append(out)
        for handle in sending:
            handle.wait()
        shape = (bsz, 1 if last_only else seqlen, model.args.dim if hidden else model.args.vocab_size)
        return stage.share_logits(torch.cat(logits, dim=0 if by_rows else 1) if logits else None, shape, device)

    def decode_interleaved(self, groups: list[slice], pos: int, inputs: Callable[[int, int], torch.Tensor],
                           step_done: StepDone) -> None:
        """Decode groups of rows through the stages at once: while stage s runs group g's step, stage s-1
        runs group g+1's, so no stage waits for another once the pipeline is full.

        Group g enters the first stage at ticks g, g + P, g + 2P, ... (P stages, at most P groups): its
        step takes one tick per stage, so its next token, chosen by the driver as the step leaves the last
        stage, is ready just as its turn comes round again. Every rank keeps the same schedule, so stage s
        knows it holds what entered the first stage s ticks ago. groups: consecutive cache rows each
        (row_groups). Starting at `pos` for every group: inputs(g, p) gives the tokens [rows, 1] group g
        feeds at position p (on every rank, only the first stage reads them); step_done(g, p, logits) runs
        on every rank, in the same order, once group g's step at p has left the last stage (logits
        [rows, 1, vocab] on rank 0, None elsewhere) and says whether the group goes on to p + 1.
        """
        stage, model = self.stage, self.model
        if len(groups) > stage.count:
            raise ValueError(f"{len(groups)} row groups for {stage.count} pipeline stages: at most one group per "
                             "stage.")
        position, live = [pos] * len(groups), [True] * len(groups)
        entered: list[tuple[int, int] | None] = []  # (group, position) that entered the first stage, per tick
        sending: list = []
        logits = None
        while True:
            group = len(entered) % stage.count
            entered.append((group, position[group]) if group < len(groups) and live[group] else None)
            if all(item is None for item in entered[-stage.count:]):  # nothing entered or in flight
                break
            tick = len(entered) - 1
            mine = entered[tick - stage.index] if tick >= stage.index else None
            if mine is not None:
                rows, p = groups[mine[0]], mine[1]
                x = inputs(*mine) if stage.is_first else stage.receive((rows.stop - rows.start, 1, model.args.dim),
                                                                         model.act_dtype, model.device)
                out = self.step(x, p, rows)
                if stage.is_last:
                    logits = out
                else:
                    sending.append(stage.send(out))
                    while len(sending) > 1:  # the one before has surely been received by now
                        sending.pop(0).wait()
            done = entered[tick - stage.count + 1] if tick >= stage.count - 1 else None
            if done is not None:
                group, p = done
                rows = groups[group]
                shape = (rows.stop - rows.start, 1, model.args.vocab_size)
                live[group] = step_done(group, p, stage.logits_to_driver(logits, shape, model.device))
                position[group] = p + 1
        for handle in sending:
            handle.wait()
