"""The scorer through a parallel Layout: any training layout gives the single-device results.

    results = score_with_layout(layout, tokenizer, requests, batch_size=16, input_len=1024, max_new_tokens=32)

Data parallelism shards the requests: sorted by work (prompt plus option tokens, or prompt plus the generation
budget), longest first, each goes to the replica with the least work so far (`deal`). Each replica scores
its own and the results come back in request order by one sum over dp: every slot of a flat tensor is filled
by the one replica that scored it and is zero on the others (tensors only, nothing pickled).

Within a replica, without tensor or pipeline parallelism the model is whole and runs flan/scorer.py's
KV-cache paths. With them, option scoring goes through Layout.logits_at, whose logits are gathered over tp
and broadcast from the last stage: each option is one row, the prompt's ids and the option's ids but the
last, and the logits at the option's positions score its tokens (the prompt is recomputed per option). Rows
are right-padded: causal attention keeps the padding after a real token out of its view and positions start
at 0 as in the cached path, so the padding changes no score.

Greedy generation keeps KV caches where the layers are: every tp rank its heads' keys and values, every
pipeline chunk those of its own layers, one cache per (microbatch, chunk). The left-padded prompts run once
through the stages (pipelined microbatches, engine/parallel/pipeline.py's run_forward with caches); then
each step feeds one position per row: its hidden states go stage to stage, the last stage's logits (whole
vocabulary, gathered over tp) give the next ids, broadcast over the pipeline so that every stage appends the
same ones (flan/scorer.py's greedy_tokens runs the loop, as on one device).

Every rank of a replica makes the same calls with the same rows (the collectives inside need it); under
sequence parallelism a row's width, a decoding step's too, is padded to a multiple of tp (left padding
with segment 0 in the cached path, which no later position attends to).
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.batch import Batch
from engine.model import KVCache
from engine.parallel import comm
from engine.parallel.pipeline import run_forward, split_microbatches
from flan.scorer import (EvalRequest, GenResult, RankResult, decoding_rows, gen_result, greedy_generate,
                         greedy_tokens, left_padded, next_ids, option_token_ids, option_logprobs, prompt_ids,
                         rank_result, score_requests)

GEN_PAD = -1  # an empty slot of a generated-ids row in the dp sum (token ids are >= 0)


def deal(work: Sequence[int], ranks: int) -> list[list[int]]:
    """Request indices per rank: longest first, each to the rank with the least work so far (lowest rank on
    ties); each rank's list in request order."""
    load, out = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        load[r] += work[i]
        out[r].append(i)
    return [sorted(x) for x in out]


def _model_parallel(layout) -> bool:
    return layout.mesh.tp > 1 or layout.mesh.pp > 1


def _sequence_multiple(layout) -> int:
    """What a row's width must divide by: tp under sequence parallelism, else 1."""
    return layout.mesh.tp if layout.cfg.parallel.sp and layout.mesh.tp > 1 else 1


def _width(layout, longest: int) -> int:
    multiple = _sequence_multiple(layout)
    return -(-longest // multiple) * multiple


def _right_padded(layout, rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    tokens = torch.full((len(rows), _width(layout, max(len(r) for r in rows))), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return Batch(tokens=tokens)


def layout_option_logprobs(layout, contexts, options, pad_id: int) -> list[list[float]]:
    """flan.scorer.option_logprobs through Layout.logits_at: one full row per option."""
    rows, targets, where = [], [], []  # where: (row, position) of each scored option token
    for ctx, opts in zip(contexts, options):
        for o in opts:
            if not o:
                raise ValueError("an option encodes to no tokens; every option needs at least one token to score")
            r = len(rows)
            rows.append(list(ctx) + list(o[:-1]))
            where += [(r, len(ctx) - 1 + j) for j in range(len(o))]
            targets += list(o)
    logits = layout.logits_at(_right_padded(layout, rows, pad_id), torch.tensor([w[0] for w in where]),
                              torch.tensor([w[1] for w in where]))
    picked = logits.log_softmax(-1).gather(-1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
    per_row = torch.zeros(len(rows), dtype=torch.float64, device=logits.device)
    per_row.index_add_(0, torch.tensor([w[0] for w in where], device=logits.device), picked.double())
    out, k = [], 0
    for opts in options:
        out.append(per_row[k:k + len(opts)].tolist())
        k += len(opts)
    return out


@torch.no_grad()
def layout_greedy_generate(layout, prompts, *, eos_id: int, pad_id: int, max_new_tokens: int,
                           stop_at=None) -> list[list[int]]:
    """flan.scorer.greedy_generate on a tp and / or pp layout, each rank caching its own heads and layers; the
    same ids on every rank of the replica."""
    device, multiple, pipeline = layout.mesh.device, _sequence_multiple(layout), layout.pipeline
    caches: dict[tuple[int, int], KVCache] = {}  # (microbatch, chunk) -> that chunk's cache of those rows
    count = 1 if pipeline is None else layout.forward_microbatches(len(prompts))

    def step(ids: torch.Tensor | None) -> torch.Tensor:
        batch = left_padded(decoding_rows(prompts, ids), pad_id, device, multiple)
        if pipeline is None:
            with layout.autocast():
                return next_ids(layout.model, batch, None, caches.setdefault((0, 0), KVCache()))
        outs = run_forward(pipeline, split_microbatches(batch, count), next_ids, autocast=layout.autocast,
                           caches=caches)
        nxt = torch.cat(outs) if outs is not None else torch.empty(len(prompts), dtype=torch.long, device=device)
        return comm.broadcast(nxt, layout.mesh.pp_group, src=layout.mesh.pp - 1)

    return greedy_tokens(step, len(prompts), eos_id=eos_id, max_new_tokens=max_new_tokens, stop_at=stop_at)


def _gather(layout, tokenizer, requests, mine: list[int], local: list, *, input_len: int, stops) -> list:
    """Every request's result on every rank, in request order: each replica's option log-probabilities and
    generated ids summed over dp into slots that only it fills; counts and texts recomputed from the ids."""
    device = layout.mesh.device
    offsets = [0]
    for r in requests:
        offsets.append(offsets[-1] + len(r.options or ()))
    flat = torch.zeros(offsets[-1], dtype=torch.float64, device=device)
    width = max([len(g.tokens) for g in local if isinstance(g, GenResult)] + [1])
    width = int(comm.all_reduce(torch.tensor(width, device=device), layout.mesh.dp_group, op="max"))
    ids = torch.zeros(len(requests), width, dtype=torch.int64, device=device)
    for i, res in zip(mine, local):
        if isinstance(res, RankResult):
            flat[offsets[i]:offsets[i + 1]] = torch.tensor(res.logprobs, dtype=torch.float64)
        else:
            ids[i] = GEN_PAD
            ids[i, :len(res.tokens)] = torch.tensor(res.tokens, dtype=torch.int64)
    flat, rows = layout.data_parallel_sum(flat).tolist(), layout.data_parallel_sum(ids).tolist()
    prompts, cut = prompt_ids(tokenizer, [r.prompt for r in requests], input_len)
    ranked = iter(option_token_ids(tokenizer, [r for r in requests if r.options is not None]))
    option_ids = [next(ranked) if r.options is not None else None for r in requests]
    return [rank_result(r, flat[offsets[i]:offsets[i + 1]], option_ids[i], prompts[i], cut[i]) if r.options is not None
            else gen_result([t for t in rows[i] if t != GEN_PAD], tokenizer, stops, prompts[i], cut[i])
            for i, r in enumerate(requests)]


def score_with_layout(layout, tokenizer, requests: Sequence[EvalRequest], *, batch_size: int, input_len: int,
                      max_new_tokens: int, stops: Sequence[str] = (), progress=None) -> list:
    """flan.scorer.score_requests on any layout: RankResult / GenResult per request, in request order, on every
    rank."""
    requests = list(requests)
    prompts = prompt_ids(tokenizer, [r.prompt for r in requests], input_len)[0]
    ranked = iter(option_token_ids(tokenizer, [r for r in requests if r.options is not None]))
    work = [len(p) + (sum(len(x) for x in next(ranked)) if r.options is not None else max_new_tokens)
            for p, r in zip(prompts, requests)]
    mine = deal(work, layout.mesh.dp)[layout.mesh.dp_rank]
    parallel = _model_parallel(layout)
    with layout.autocast():
        local = score_requests(layout if parallel else layout.model, tokenizer, [requests[k] for k in mine],
                               batch_size=batch_size, input_len=input_len, max_new_tokens=max_new_tokens, stops=stops,
                               progress=progress, scorer=layout_option_logprobs if parallel else option_logprobs,
                               generator=layout_greedy_generate if parallel else greedy_generate)
    if layout.mesh.dp == 1:
        return local
    return _gather(layout, tokenizer, requests, mine, local, input_len=input_len, stops=stops)
