"""Greedy generation on a pipeline and / or tensor layout with each rank's KV caches gives exactly the
single-device generations on the same weights and prompts (rows of different lengths, one ending early at EOS),
under gloo for pp=2 with interleaved chunks, tp=2 and pp=2 x tp=2, both with sequence parallelism; and the
caches are used: after the prompt, every block on every rank sees one position per row and step (counted with
forward hooks), as many steps as on one device."""
from __future__ import annotations

import pytest

from tests.engine.parallel.launch import launch

PROMPTS = [[5, 9, 14, 30, 22], [41, 7], [12, 18, 33, 60, 8, 27, 50], [19, 44, 6]]
MAX_NEW = 5


def _block_widths(model) -> dict[str, list[int]]:
    """Per block of `model`, the sequence length of every input it is called with (recorded from now on)."""
    widths: dict[str, list[int]] = {}
    for name, block in model.layers.items():
        widths[name] = []
        block.register_forward_pre_hook(lambda _m, args, w=widths[name]: w.append(args[0].shape[1]))
    return widths


def generation_worker(parallel: dict) -> list[str]:
    from engine.model import build_model
    from engine.parallel import init_mesh, parallelize
    from flan.layout_scorer import layout_greedy_generate
    from flan.scorer import greedy_generate
    from tests.flan.conftest import small_layout_config

    cfg = small_layout_config(parallel, vocab_size=64, n_layers=4, init_std=0.5)
    one = build_model(cfg.model, seed=2).eval()
    # An EOS that ends row 0 after one token while another row runs to the budget (checked below).
    eos = greedy_generate(one, PROMPTS, eos_id=-1, pad_id=0, max_new_tokens=MAX_NEW)[0][1]
    reference = _block_widths(one)
    want = greedy_generate(one, PROMPTS, eos_id=eos, pad_id=0, max_new_tokens=MAX_NEW)
    assert len(want[0]) == 1 and max(len(g) for g in want) == MAX_NEW, f"eos {eos} does not end rows apart: {want}"
    decode_steps = len(reference["0"]) - 1  # one prompt pass, then one call per step

    layout = parallelize(build_model(cfg.model, seed=2).eval(), cfg, init_mesh(cfg))
    widths = _block_widths(layout.model)
    got = layout_greedy_generate(layout, PROMPTS, eos_id=eos, pad_id=0, max_new_tokens=MAX_NEW)
    failures = [f"{parallel} rank {layout.mesh.rank}: generated {got} vs one device {want}"] if got != want else []
    microbatches = 1 if layout.pipeline is None else layout.forward_microbatches(len(PROMPTS))
    for name, seen in widths.items():  # under sp a block holds S / tp positions: a step is padded to tp
        if seen[microbatches:] != [1] * (microbatches * decode_steps):
            failures.append(f"{parallel} rank {layout.mesh.rank} layer {name}: input widths {seen} (one device: "
                            f"{reference[name]}, {microbatches} microbatches); a step must feed one position")
    return failures


@pytest.mark.parametrize("parallel,world", [
    (dict(pp=2, virtual_stages=2, schedule="interleaved", microbatches=2), 2),
    (dict(tp=2, sp=True), 2),
    (dict(pp=2, tp=2, sp=True, microbatches=2), 4),
], ids=["pp2-interleaved", "tp2-sp", "pp2-tp2-sp"])
def test_cached_generation_on_a_layout_equals_one_device(parallel, world):
    failures = [f for rank in launch(generation_worker, world, parallel, timeout=120) for f in rank]
    assert not failures, "\n".join(failures)
