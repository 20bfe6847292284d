"""Pipeline schedules as data: every program is complete and consistent, runs without deadlock, and its
simulated bubble and peak in-flight microbatches equal the textbook formulas."""
from __future__ import annotations

import argparse
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.parallel.schedule_cli import add_pipeline_commands
from engine.parallel.schedules import (COMM, Action, bubble_formula, check_schedule, comm_batches, compute_groups,
                                       message_key, schedule_actions, simulate)


def compute_order(schedule: str, pp: int, rank: int, microbatches: int, virtual: int = 1) -> list[Action]:
    """This rank's forwards and backwards, in the order it runs them."""
    return [a for group in compute_groups(schedule, pp, rank, microbatches, virtual) for a in group]


plain = st.tuples(st.sampled_from(["gpipe", "1f1b"]), st.integers(1, 6), st.integers(1, 12), st.just(1))


@st.composite
def interleaved(draw):
    pp, v = draw(st.integers(2, 5)), draw(st.integers(1, 3))
    return "interleaved", pp, pp * draw(st.integers(1, 4)), v


@settings(max_examples=40, deadline=None)
@given(spec=st.one_of(plain, interleaved()))
def test_every_microbatch_runs_forward_then_backward_once_per_chunk(spec):
    schedule, pp, M, v = spec
    for rank, program in enumerate(schedule_actions(schedule, pp, M, v)):
        compute = [a for a in program if a.kind in ("forward", "backward")]
        expected = {(k, m, c) for k in ("forward", "backward") for m in range(M) for c in range(v)}
        assert sorted((a.kind, a.microbatch, a.chunk) for a in compute) == sorted(expected)
        for m in range(M):
            for c in range(v):
                assert compute.index(Action("forward", m, c)) < compute.index(Action("backward", m, c))


@settings(max_examples=40, deadline=None)
@given(spec=st.one_of(plain, interleaved()))
def test_every_send_has_one_matching_receive(spec):
    schedule, pp, M, v = spec
    sends, receives = [], []
    for rank, program in enumerate(schedule_actions(schedule, pp, M, v)):
        for a in program:
            if a.kind in COMM:
                (sends if a.kind.startswith("send") else receives).append(message_key(a, rank, pp, M))
    assert sorted(sends) == sorted(receives) and len(set(sends)) == len(sends)


@settings(max_examples=60, deadline=None)
@given(spec=st.one_of(plain, interleaved()))
def test_simulated_bubble_equals_the_formula(spec):
    """(p-1)/(m+p-1) for gpipe and 1f1b, (p-1)/(v m+p-1) interleaved, with backward = 2 x forward."""
    schedule, pp, M, v = spec
    timeline = simulate(schedule_actions(schedule, pp, M, v), pp, v)
    assert timeline.bubble_fraction == pytest.approx(bubble_formula(schedule, pp, M, v), abs=1e-9)
    if pp > 1 and M > 1 and v > 1:
        assert timeline.bubble_fraction < bubble_formula("1f1b", pp, M)


@settings(max_examples=40, deadline=None)
@given(pp=st.integers(1, 6), M=st.integers(1, 12))
def test_peak_in_flight_is_m_for_gpipe_and_at_most_p_for_1f1b(pp, M):
    gpipe = simulate(schedule_actions("gpipe", pp, M), pp)
    one_f_one_b = simulate(schedule_actions("1f1b", pp, M), pp)
    assert gpipe.peak_in_flight == [M] * pp
    assert one_f_one_b.peak_in_flight[0] == min(pp, M)
    assert all(peak <= min(pp - rank, M) for rank, peak in enumerate(one_f_one_b.peak_in_flight))


def test_interleaved_steady_state_exchanges_a_forward_and_a_backward_together():
    program = schedule_actions("interleaved", 2, 4, 2)[0]
    # Rank 0 of pp=2 with v=2 and 4 microbatches: (p-1) 2 + (v-1) p = 4 warm-up forwards, then forward/backward
    # pairs; a pair's two results and the next pair's inputs move in one batch.
    assert [str(a) for a in program if a.kind == "forward"][:4] == ["F0", "F1", "F0.1", "F1.1"]
    assert [str(a) for a in program[10:20]] == ["recv_bwd0.1", "F2", "B0.1", "send_fwd2", "send_bwd0.1",
                                                "recv_bwd1.1", "F3", "B1.1", "send_fwd3", "send_bwd1.1"]
    assert ["send_fwd2", "send_bwd0.1", "recv_bwd1.1"] in [[str(a) for a in run] for run in comm_batches(program)]


def test_1f1b_order_on_a_small_pipeline():
    order = [str(a) for a in compute_order("1f1b", pp=3, rank=0, microbatches=4)]
    assert order == ["F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"]
    assert [str(a) for a in compute_order("1f1b", pp=3, rank=2, microbatches=4)] == [
        "F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_waiting_for_a_gradient_before_sending_the_activation_deadlocks_in_the_simulator():
    first, last = schedule_actions("gpipe", 2, 1)
    assert [str(a) for a in first] == ["F0", "send_fwd0", "recv_bwd0", "B0"]
    reordered = [Action("recv_bwd", 0), Action("forward", 0), Action("send_fwd", 0), Action("backward", 0)]
    simulate([first, last], 2)
    with pytest.raises(RuntimeError, match="deadlocks: rank 0 waits at recv_bwd"):
        simulate([reordered, last], 2)


@pytest.mark.parametrize("schedule, pp, M, v, message", [
    ("interleaved", 4, 6, 2, "microbatches=6: .* groups of pp=4; choose a multiple of 4"),
    ("1f1b", 2, 4, 2, "virtual_stages=2 needs --parallel.schedule=interleaved"),
    ("interleaved", 1, 2, 2, "virtual_stages=2 needs parallel.pp >= 2"),
    ("zigzag", 2, 2, 1, "schedule='zigzag' is unknown; choose one of gpipe, 1f1b, interleaved"),
    ("gpipe", 2, 0, 1, "must all be at least 1"),
])
def test_unsuitable_sizes_are_clear_errors(schedule, pp, M, v, message):
    with pytest.raises(ValueError, match=message):
        check_schedule(schedule, pp, M, v)


def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_pipeline_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pipeline-schedule", *argv])
    return args.func(args)


def test_pipeline_schedule_command_prints_the_timeline_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "timeline.png"
    assert run_command(["--pp", "4", "--microbatches", "8", "--schedule", "1f1b", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("rank 0: F0  F1  F2  F3  ....")
    assert "bubble fraction 0.2727 (formula 0.2727)" in text  # 3 / (8 + 3)
    assert "peak microbatches in flight per stage: 4, 3, 2, 1" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_command(["--pp", "4", "--microbatches", "8", "--schedule", "interleaved", "--virtual-stages", "2",
                        "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bubble_fraction"] == pytest.approx(3 / 19)  # (p-1) / (v m + p - 1)
    assert run_command(["--pp", "4", "--microbatches", "6", "--schedule", "interleaved", "--virtual-stages", "2"]) == 2
    assert "choose a multiple of 4" in capsys.readouterr().err
