"""The zero-shot scorer: rank classification over options, and greedy generation with a KV cache.

    requests = [EvalRequest("rte", template=0, example=7, prompt=..., target="yes", options=("yes", "no"), gold=0)]
    results = score_requests(model, tokenizer, requests, batch_size=16, max_new_tokens=32, input_len=1024)
    results[0].logprobs, results[0].prediction          # RankResult for requests with options
    results[1].text                                      # GenResult for the others

Token layout = instruction tuning's (flan/packing.py): the prompt's ids (its last `input_len` tokens; one
BOS when it encodes to nothing) followed directly by the target's ids, no separator. An option's score is the
sum of its tokens' log-probabilities after the prompt (FLAN's rank classification); we also keep its token
count and UTF-8 byte count for the length-normalised variants.

Sharing the prompt. Examples are sorted by prompt length (longest first) and batched; each prompt runs
once, left-padded, filling a KVCache, and its last position already scores every option's first token.
Options longer than one token then run as one continuation batch over the cache, expanded to one row per
option, so the prompt is never recomputed per option. This is exact: a continuation attends to the same
keys and values, at the same positions, as the full (prompt + option) sequence would (tests check it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from engine.batch import Batch
from engine.model import KVCache


@dataclass(frozen=True)
class EvalRequest:
    """One rendered example: options (and the gold index) for rank classification, None for generation."""
    dataset: str
    template: int
    example: int
    prompt: str
    target: str
    options: tuple[str, ...] | None = None
    gold: int | None = None
    also_accepted: tuple[str, ...] = ()   # generation: other correct answers (QA rows list several)
    delimiter: str = ""                   # text between prompt and option (the template's; flan/templates.py)

    @property
    def references(self) -> tuple[str, ...]:
        return (self.target,) + tuple(a for a in self.also_accepted if a != self.target)


@dataclass(frozen=True)
class RankResult:
    logprobs: tuple[float, ...]   # summed log-probability of each option
    n_tokens: tuple[int, ...]
    n_bytes: tuple[int, ...]
    prompt_tokens: int = 0        # after the cut to input_len
    truncated: bool = False       # whether the prompt was cut (its first tokens dropped)

    @property
    def prediction(self) -> int:
        return _argmax(self.logprobs)

    @property
    def prediction_per_token(self) -> int:
        return _argmax([lp / n for lp, n in zip(self.logprobs, self.n_tokens)])

    @property
    def prediction_per_byte(self) -> int:
        return _argmax([lp / max(n, 1) for lp, n in zip(self.logprobs, self.n_bytes)])


@dataclass(frozen=True)
class GenResult:
    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int = 0
    truncated: bool = False


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of equals, like numpy


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device, multiple: int = 1) -> Batch:
    """Rows right-aligned in one (B, max len) batch, the width rounded up to `multiple` (sequence parallelism
    splits it over tp); padding has segment id 0 (KVCache's convention)."""
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segments = torch.zeros(len(rows), width, dtype=torch.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        segments[i, width - len(r):] = 1
    return Batch(tokens=tokens, segment_ids=segments).to(device)


def _expand(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """A cache holding row rows[i] of `cache` at row i (one copy of a prompt per option)."""
    return KVCache({k: v.index_select(0, rows) for k, v in cache.keys.items()},
                   {k: v.index_select(0, rows) for k, v in cache.values.items()},
                   cache.segment_ids.index_select(0, rows))


@torch.no_grad()
def option_logprobs(model, contexts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]],
                    pad_id: int) -> list[list[float]]:
    """Summed log-probabilities of each option's ids after its context, for one batch of contexts."""
    owner = [b for b, opts in enumerate(options) for _ in opts]
    flat = [list(o) for opts in options for o in opts]
    if any(not o for o in flat):
        raise ValueError("an option encodes to no tokens; every option needs at least one token to score")
    device = _device(model)
    cache = KVCache()
    # Final-normed hidden states: the vocabulary projection is needed at the prompt's last position only.
    h = model(left_padded(contexts, pad_id, device), cache=cache, return_hidden=True)  # (B, W, d)
    first = model.output(h[:, -1]).float().log_softmax(-1)  # (B, V): the next token after each prompt
    scores = first[torch.tensor(owner, device=device), torch.tensor([o[0] for o in flat], device=device)]
    longest = max(len(o) for o in flat)
    if longest > 1:
        # Continuation rows: option ids but the last, right-padded with segment 0 so they attend to nothing.
        cont = torch.full((len(flat), longest - 1), pad_id, dtype=torch.long)
        segments = torch.zeros(len(flat), longest - 1, dtype=torch.int32)
        for r, o in enumerate(flat):
            cont[r, :len(o) - 1] = torch.tensor(o[:-1])
            segments[r, :len(o) - 1] = 1
        expanded = _expand(cache, torch.tensor(owner, device=device))
        out = model(Batch(tokens=cont, segment_ids=segments).to(device), cache=expanded)
        logp = out.float().log_softmax(-1)  # (R, L, V): position t predicts option token t + 1
        nxt = torch.full_like(cont, 0)
        for r, o in enumerate(flat):
            nxt[r, :len(o) - 1] = torch.tensor(o[1:])
        picked = logp.gather(-1, nxt.to(device)[..., None])[..., 0] * segments.to(device)
        scores = scores + picked.sum(-1)
    out_lists, k = [], 0
    for opts in options:
        out_lists.append(scores[k:k + len(opts)].tolist())
        k += len(opts)
    return out_lists


def prompt_ids(tokenizer, prompts: list[str], input_len: int) -> tuple[list[list[int]], list[bool]]:
    """Instruction tuning's input rule (flan/packing.py's input_window), BOS first where the model adds it; and
    whether each prompt was cut."""
    from flan.packing import input_window

    encoded = tokenizer.encode_batch(prompts)
    room = input_len - 1 if tokenizer.add_bos else input_len
    return ([input_window(ids, input_len, tokenizer.bos_id, tokenizer.add_bos) for ids in encoded],
            [len(ids) > room for ids in encoded])


def batches(order: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), size):
        yield order[start:start + size]


def option_token_ids(tokenizer, requests: Sequence[EvalRequest]) -> list[list[list[int]]]:
    """Each request's options as the ids scored after its prompt: the option's own ids (each distinct option
    encoded once), or with a template delimiter the ids of (prompt + delimiter + option) past the prompt's."""
    unique = sorted({o for r in requests if not r.delimiter for o in r.options})
    own = dict(zip(unique, tokenizer.encode_batch(unique)))
    out = []
    for r in requests:
        if not r.delimiter:
            out.append([own[o] for o in r.options])
            continue
        n = len(tokenizer.encode(r.prompt))
        out.append([ids[n:] for ids in tokenizer.encode_batch([r.prompt + r.delimiter + o for o in r.options])])
    return out


def rank_result(request: EvalRequest, logprobs, ids: list[list[int]], context: list[int], cut: bool) -> RankResult:
    return RankResult(tuple(logprobs), tuple(len(x) for x in ids),
                      tuple(len(o.encode("utf-8")) for o in request.options), len(context), cut)


def rank_classify(model, tokenizer, requests: Sequence[EvalRequest], *, batch_size: int, input_len: int,
                  progress=None, scorer=option_logprobs) -> list[RankResult]:
    """Score every option of every request with scorer(model, contexts, options, pad_id) (option_logprobs, or
    a layout's: flan/layout_scorer.py); results in request order."""
    contexts, cut = prompt_ids(tokenizer, [r.prompt for r in requests], input_len)
    option_ids = option_token_ids(tokenizer, requests)
    order = sorted(range(len(requests)), key=lambda i: -len(contexts[i]))  # similar lengths pad less
    results: list[RankResult | None] = [None] * len(requests)
    for chunk in batches(order, batch_size):
        scored = scorer(model, [contexts[i] for i in chunk], [option_ids[i] for i in chunk], tokenizer.pad_id)
        for i, lp in zip(chunk, scored):
            results[i] = rank_result(requests[i], lp, option_ids[i], contexts[i], cut[i])
        if progress is not None:
            progress.update(len(chunk))
    return results


def greedy_tokens(step, rows: int, *, eos_id: int, max_new_tokens: int, stop_at=None) -> list[list[int]]:
    """The greedy loop, whatever runs the model: step(None) returns the next id (rows,) after each prompt,
    step(ids) feeds those ids (one per row, every row, finished or not) and returns the next ones. A row ends at
    EOS (not kept), after `max_new_tokens`, or when stop_at(its ids) is true; the loop ends with the last row."""
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    nxt = step(None)
    for _ in range(max_new_tokens):
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t == eos_id:
                done[b] = True
                continue
            generated[b].append(t)
            done[b] = stop_at is not None and stop_at(generated[b])
        if all(done):
            break
        nxt = step(nxt)
    return generated


def next_ids(model, batch: Batch, hidden: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """The greedy next id (rows,) after each row of `batch`, extending `cache`; the vocabulary projection at the
    last position only. Also a pipeline's last-stage `finish` (flan/layout_scorer.py)."""
    return model.output(model(batch, hidden=hidden, cache=cache, return_hidden=True)[:, -1]).argmax(-1)


def decoding_rows(prompts: Sequence[Sequence[int]], ids: torch.Tensor | None) -> Sequence[Sequence[int]]:
    """What a greedy step feeds (left-padded): the prompts first, then each row's last id."""
    return prompts if ids is None else [[t] for t in ids.tolist()]


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
                    stop_at=None) -> list[list[int]]:
    """Greedy continuation of each prompt (one batch) until EOS, `max_new_tokens`, or stop_at(ids) is true: the
    prompts once into a KVCache, then one position per row and step."""
    device, cache = _device(model), KVCache()

    def step(ids: torch.Tensor | None) -> torch.Tensor:
        return next_ids(model, left_padded(decoding_rows(prompts, ids), pad_id, device), None, cache)

    return greedy_tokens(step, len(prompts), eos_id=eos_id, max_new_tokens=max_new_tokens, stop_at=stop_at)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text up to the first stop string (FLAN's few-shot exemplar separator, for instance)."""
    cuts = [text.index(s) for s in stops if s and s in text]
    return text[:min(cuts)] if cuts else text


def gen_result(ids: Sequence[int], tokenizer, stops: Sequence[str], prompt: list[int], cut: bool) -> GenResult:
    return GenResult(cut_at_stop(tokenizer.decode(list(ids)), stops).strip(), tuple(ids), len(prompt), cut)


def generate(model, tokenizer, requests: Sequence[EvalRequest], *, batch_size: int, input_len: int,
             max_new_tokens: int, stops: Sequence[str] = (), progress=None, generator=greedy_generate
             ) -> list[GenResult]:
    """Greedy generations for requests without options with generator(model, prompts, ...) (greedy_generate,
    or a layout's); results in request order."""
    prompts, cut = prompt_ids(tokenizer, [r.prompt for r in requests], input_len)
    order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
    stop_at = (lambda ids: any(s in tokenizer.decode(ids) for s in stops if s)) if stops else None
    results: list[GenResult | None] = [None] * len(requests)
    for chunk in batches(order, batch_size):
        outs = generator(model, [prompts[i] for i in chunk], eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                         max_new_tokens=max_new_tokens, stop_at=stop_at)
        for i, ids in zip(chunk, outs):
            results[i] = gen_result(ids, tokenizer, stops, prompts[i], cut[i])
        if progress is not None:
            progress.update(len(chunk))
    return results


def score_requests(model, tokenizer, requests: Sequence[EvalRequest], *, batch_size: int, input_len: int,
                   max_new_tokens: int, stops: Sequence[str] = (), progress=None, scorer=option_logprobs,
                   generator=greedy_generate) -> list[RankResult | GenResult]:
    """Rank classification for requests with options, generation for the rest; results in request order.
    `scorer` and `generator` run the model (the cached single-device paths, or a layout's)."""
    ranked = [i for i, r in enumerate(requests) if r.options is not None]
    free = [i for i, r in enumerate(requests) if r.options is None]
    results: list = [None] * len(requests)
    if ranked:
        for i, res in zip(ranked, rank_classify(model, tokenizer, [requests[i] for i in ranked],
                                                batch_size=batch_size, input_len=input_len, progress=progress,
                                                scorer=scorer)):
            results[i] = res
    if free:
        for i, res in zip(free, generate(model, tokenizer, [requests[i] for i in free], batch_size=batch_size,
                                         input_len=input_len, max_new_tokens=max_new_tokens, stops=stops,
                                         progress=progress, generator=generator)):
            results[i] = res
    return results
