"""Vocab-parallel cross-entropy under gloo: 2 and 4 real processes against the unsharded reference.

Each rank holds the contiguous slice [rank*Vr, (rank+1)*Vr) of the logits (or of the weight's rows) and
the same targets (global ids) and hidden states; its loss must equal the unsharded loss, its gradient
the matching slice of the unsharded gradient (the whole gradient for hidden). One launch per world size
runs every case, since process start-up dominates the cost.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels.cross_entropy import cross_entropy, cross_entropy_reference, linear_cross_entropy

# (label_smoothing, z_loss, reduction, ignore every target)
CASES = [(0.0, 0.0, "mean", False), (0.1, 1e-3, "mean", False), (0.0, 1e-3, "sum", False),
         (0.1, 0.0, "none", False), (0.1, 1e-3, "mean", True)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(expected.abs().max().item(), 1e-3)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= 1e-5 * scale, f"rank {dist.get_rank()}: {what}: error {error:.3g} (scale {scale:.3g})"


def _case_inputs(case_index: int, n: int, vocab: int, dim: int, ignore_all: bool):
    """The same full tensors on every rank (same seed)."""
    gen = torch.Generator().manual_seed(case_index)
    logits = 3 * torch.randn(n, vocab, generator=gen)
    hidden = torch.randn(n, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.25] = -100
    if ignore_all:
        target[:] = -100
    row_grad = torch.randn(n, generator=gen)  # the upstream gradient of reduction="none"
    return logits, hidden, weight, target, row_grad


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(TRITON_INTERPRET="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n, vocab_slice, dim = 11, 23, 6  # 23 columns per rank: not a multiple of any block size
        vocab = vocab_slice * world
        cols = slice(rank * vocab_slice, (rank + 1) * vocab_slice)
        for index, (smoothing, z_loss, reduction, ignore_all) in enumerate(CASES):
            opts = dict(label_smoothing=smoothing, z_loss=z_loss, reduction=reduction)
            logits, hidden, weight, target, row_grad = _case_inputs(index, n, vocab, dim, ignore_all)
            upstream = row_grad if reduction == "none" else torch.tensor(0.5)

            full = logits.clone().requires_grad_()
            ref_loss = cross_entropy_reference(full, target, **opts)
            ref_loss.backward(upstream)
            local = logits[:, cols].contiguous().requires_grad_()
            loss = cross_entropy(local, target, group=dist.group.WORLD, **opts)
            loss.backward(upstream)
            _check(loss, ref_loss, f"cross_entropy loss {opts}")
            _check(local.grad, full.grad[:, cols], f"cross_entropy grad {opts}")
            with torch.no_grad():  # the statistics-only path (evaluation)
                _check(cross_entropy(local, target, group=dist.group.WORLD, **opts), ref_loss, f"no_grad loss {opts}")

            full_h, full_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            ref_loss = cross_entropy_reference(full_h @ full_w.t(), target, **opts)
            ref_loss.backward(upstream)
            h = hidden.clone().requires_grad_()
            w = weight[cols].contiguous().requires_grad_()
            loss = linear_cross_entropy(h, w, target, group=dist.group.WORLD, chunk_size=4, **opts)
            loss.backward(upstream)
            _check(loss, ref_loss, f"linear loss {opts}")
            _check(h.grad, full_h.grad, f"linear grad of hidden {opts}")
            _check(w.grad, full_w.grad[cols], f"linear grad of weight {opts}")
        _check_single_rank_group_calls_no_collective(rank, world)
    finally:
        dist.destroy_process_group()


def _check_single_rank_group_calls_no_collective(rank: int, world: int) -> None:
    """A group of one rank (and no group) must not reach torch.distributed's collectives."""
    singles = [dist.new_group([r]) for r in range(world)]  # every rank takes part in creating each group
    logits, target = torch.randn(5, 9, requires_grad=True), torch.tensor([0, 3, -100, 8, 2])
    original = dist.all_reduce

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called at world size 1")

    dist.all_reduce = forbidden
    try:
        for group in (None, singles[rank]):
            cross_entropy(logits, target, group=group).backward()
            hidden, weight = torch.randn(5, 3, requires_grad=True), torch.randn(9, 3, requires_grad=True)
            linear_cross_entropy(hidden, weight, target, group=group).backward()
    finally:
        dist.all_reduce = original


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_unsharded(world):
    mp.start_processes(_worker, args=(world, _free_port()), nprocs=world, start_method="spawn", join=True)
