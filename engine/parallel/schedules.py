"""Pipeline schedules as data: a pure function gives every pipeline rank its ordered actions, and a simulator
plays them on a clock.

    actions = schedule_actions("1f1b", pp=4, microbatches=8)        # actions[rank] = [Action, ...]
    timeline = simulate(actions, pp=4, virtual=1)                   # busy intervals, bubble, peak in flight

Model chunk `c` of pipeline rank `r` is global stage c * pp + r (Megatron's interleaving: with v chunks per
rank, rank r holds the non-contiguous stages r, r + pp, ...). A rank's compute actions (forward or backward of
one microbatch through one chunk) come in groups: the receives of a group's inputs go just before it and the
sends of its outputs just after, and the runner merges consecutive communication actions into one batched
send/receive. In 1F1B every compute is its own group, so a rank posts "send my forward output + receive the
next backward's gradient" together, as Megatron's 1F1B does; in the interleaved steady state a group is one
forward and one backward, whose two results and the next two inputs move in one batch (Megatron-LM's
interleaved exchange). `simulate` holds every batch until all its partner actions are posted (the rendezvous
of grouped NCCL send/receive; gloo, where the runner lets sends run in the background, is more permissive),
so a schedule it finishes cannot deadlock on either backend.

Schedules (per-rank compute order):
    gpipe        all forwards, then all backwards (Huang et al. 2019)
    1f1b         PipeDream-Flush (Narayanan et al. 2021): pp - rank - 1 warm-up forwards, then one forward /
                 one backward alternately, then the remaining backwards; at most pp microbatches in flight
    interleaved  1F1B over v chunks per rank (Narayanan et al. 2021, section 2.2): microbatches go through the
                 chunks in groups of pp, shrinking the bubble about v times; needs microbatches % pp == 0
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SCHEDULES = ("gpipe", "1f1b", "interleaved")
COMPUTE = ("forward", "backward")
COMM = ("send_fwd", "recv_fwd", "send_bwd", "recv_bwd")


@dataclass(frozen=True)
class Action:
    """One step of a rank's program: compute or move one microbatch's tensor for one local chunk."""

    kind: Literal["forward", "backward", "send_fwd", "recv_fwd", "send_bwd", "recv_bwd"]
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        short = {"forward": "F", "backward": "B"}.get(self.kind, self.kind)
        return f"{short}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def check_schedule(schedule: str, pp: int, microbatches: int, virtual: int) -> None:
    """Raise ValueError (naming the flag and the fix) when the schedule cannot run these sizes."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if pp < 1 or virtual < 1 or microbatches < 1:
        raise ValueError(f"pipeline: pp={pp}, virtual_stages={virtual} and microbatches={microbatches} must all "
                         "be at least 1")
    if virtual > 1 and pp == 1:
        raise ValueError(f"parallel.virtual_stages={virtual} needs parallel.pp >= 2; one pipeline rank has no "
                         "neighbour to interleave with")
    if virtual > 1 and schedule != "interleaved":
        raise ValueError(f"parallel.virtual_stages={virtual} needs --parallel.schedule=interleaved "
                         f"(got {schedule!r}); gpipe and 1f1b run one chunk per rank")
    if schedule == "interleaved" and microbatches % pp:
        raise ValueError(f"parallel.microbatches={microbatches}: the interleaved schedule moves microbatches "
                         f"through the chunks in groups of pp={pp}; choose a multiple of {pp}")


def compute_groups(schedule: str, pp: int, rank: int, microbatches: int, virtual: int = 1) -> list[list[Action]]:
    """This rank's forwards and backwards in the order it runs them, grouped between communication points."""
    check_schedule(schedule, pp, microbatches, virtual)
    M = microbatches
    forwards = [Action("forward", m) for m in range(M)]
    backwards = [Action("backward", m) for m in range(M)]
    if schedule == "gpipe":
        return [[a] for a in forwards + backwards]
    if schedule == "1f1b":
        warmup = min(pp - rank - 1, M)
        return [[a] for group in _one_forward_one_backward(forwards, backwards, warmup) for a in group]
    # Interleaved: the k-th forward of this rank is microbatch (k // (pp v)) pp + k % pp through chunk
    # (k // pp) % v; backwards walk the chunks in reverse. Warm-up fills the pipeline for every chunk: each
    # extra chunk adds a group of pp forwards, and a steady-state result leaves one forward/backward pair
    # late, which costs two forwards per step down the pipeline (Megatron-LM's count).
    total = M * virtual

    def virtual_action(kind: str, k: int) -> Action:
        chunk = (k // pp) % virtual
        microbatch = (k // (pp * virtual)) * pp + k % pp
        return Action(kind, microbatch, chunk if kind == "forward" else virtual - 1 - chunk)

    if microbatches == pp:
        warmup = total  # one group of microbatches: every forward fits before the first backward is due
    else:
        warmup = min((pp - rank - 1) * 2 + (virtual - 1) * pp, total)
    forwards = [virtual_action("forward", k) for k in range(total)]
    backwards = [virtual_action("backward", k) for k in range(total)]
    return _one_forward_one_backward(forwards, backwards, warmup)


def _one_forward_one_backward(forwards: list[Action], backwards: list[Action], warmup: int) -> list[list[Action]]:
    """`warmup` forwards, then forward/backward pairs, then the remaining backwards."""
    steady = len(forwards) - warmup
    return ([[f] for f in forwards[:warmup]] + [[forwards[warmup + i], backwards[i]] for i in range(steady)]
            + [[b] for b in backwards[steady:]])


def stage_of(rank: int, chunk: int, pp: int) -> int:
    """Global stage index of local chunk `chunk` on pipeline rank `rank`."""
    return chunk * pp + rank


def schedule_actions(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> list[list[Action]]:
    """Every pipeline rank's program: its compute groups, each with the receives of its inputs before it and
    the sends of its outputs after it."""
    return [with_communication(compute_groups(schedule, pp, rank, microbatches, virtual), rank, pp, virtual)
            for rank in range(pp)]


def forward_only_actions(pp: int, virtual: int = 1, microbatches: int = 1) -> list[list[Action]]:
    """Every rank's program for the forward of `microbatches` microbatches through all stages (evaluation):
    microbatch by microbatch, each chunk in stage order. Sends do not wait for their receiver, so stage s runs
    microbatch m while stage s+1 runs m-1: the forward half of GPipe, with no backward to wait for."""
    return [with_communication([[Action("forward", m, c)] for m in range(microbatches) for c in range(virtual)],
                               rank, pp, virtual)
            for rank in range(pp)]


def with_communication(groups: list[list[Action]], rank: int, pp: int, virtual: int) -> list[Action]:
    """Around each group of compute actions: the receives of their inputs from the neighbouring stages before,
    the sends of their outputs after."""
    last = pp * virtual - 1
    program = []
    for group in groups:
        receives, sends = [], []
        for a in group:
            stage = stage_of(rank, a.chunk, pp)
            if a.kind == "forward":
                receives += [Action("recv_fwd", a.microbatch, a.chunk)] if stage > 0 else []
                sends += [Action("send_fwd", a.microbatch, a.chunk)] if stage < last else []
            else:
                receives += [Action("recv_bwd", a.microbatch, a.chunk)] if stage < last else []
                sends += [Action("send_bwd", a.microbatch, a.chunk)] if stage > 0 else []
        program += receives + group + sends
    return program


def comm_batches(program: list[Action]) -> list[list[Action]]:
    """The program cut into runs: each compute action alone, consecutive communication actions together."""
    runs: list[list[Action]] = []
    for a in program:
        if a.kind in COMM and runs and runs[-1][0].kind in COMM:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs


def peer_of(action: Action, rank: int, pp: int) -> int:
    """The pipeline rank on the other end of a communication action."""
    return (rank + 1) % pp if action.kind in ("send_fwd", "recv_bwd") else (rank - 1) % pp


def message_key(action: Action, rank: int, pp: int, microbatches: int) -> tuple[int, int, int]:
    """(source rank, destination rank, tag) of the message an action sends or receives. The tag is unique per
    (direction, receiving stage, microbatch), so both ends name each message the same way."""
    stage = stage_of(rank, action.chunk, pp)
    peer = peer_of(action, rank, pp)
    forward = action.kind in ("send_fwd", "recv_fwd")
    receiving_stage = {"send_fwd": stage + 1, "recv_fwd": stage, "send_bwd": stage - 1, "recv_bwd": stage}[action.kind]
    tag = (receiving_stage * microbatches + action.microbatch) * 2 + int(forward)
    src, dst = (rank, peer) if action.kind.startswith("send") else (peer, rank)
    return src, dst, tag


@dataclass
class Timeline:
    """What `simulate` found: per rank its compute intervals (start, end, action), and the summary numbers."""

    intervals: list[list[tuple[float, float, Action]]]
    makespan: float
    bubble: list[float] = field(default_factory=list)
    """Per rank: idle time over the makespan."""
    peak_in_flight: list[int] = field(default_factory=list)
    """Per rank: most microbatches whose activations (in any chunk) it held at once."""

    @property
    def bubble_fraction(self) -> float:
        return sum(self.bubble) / len(self.bubble)


def simulate(programs: list[list[Action]], pp: int, virtual: int = 1, forward_time: float = 1.0,
             backward_time: float = 2.0, microbatches: int | None = None) -> Timeline:
    """Play the programs on a clock: a chunk's forward takes forward_time / virtual (a stage's work is split
    over its chunks), a backward backward_time / virtual, communication takes no time but a batch waits until
    every partner of its sends and receives is posted. Raises RuntimeError naming the stuck actions on a
    deadlock."""
    M = microbatches if microbatches is not None else 1 + max(a.microbatch for p in programs for a in p)
    runs = [comm_batches(p) for p in programs]
    position, clock = [0] * pp, [0.0] * pp
    posted: dict[tuple[int, int, int], float] = {}
    intervals: list[list[tuple[float, float, Action]]] = [[] for _ in range(pp)]
    progress = True
    while progress:
        progress = False
        for rank in range(pp):
            while position[rank] < len(runs[rank]):
                run = runs[rank][position[rank]]
                if run[0].kind in COMPUTE:
                    duration = (forward_time if run[0].kind == "forward" else backward_time) / virtual
                    intervals[rank].append((clock[rank], clock[rank] + duration, run[0]))
                    clock[rank] += duration
                else:
                    keys = [(message_key(a, rank, pp, M), a.kind.startswith("send")) for a in run]
                    for key, is_send in keys:
                        posted.setdefault((*key, is_send), clock[rank])
                    partners = [(*key, not is_send) for key, is_send in keys]
                    if not all(p in posted for p in partners):
                        break
                    clock[rank] = max([clock[rank]] + [posted[p] for p in partners])
                position[rank] += 1
                progress = True
    stuck = {rank: runs[rank][position[rank]] for rank in range(pp) if position[rank] < len(runs[rank])}
    if stuck:
        raise RuntimeError("pipeline schedule deadlocks: " + "; ".join(
            f"rank {r} waits at {', '.join(f'{a.kind} {a}' for a in run)}" for r, run in stuck.items()))
    makespan = max(clock)
    busy = [sum(end - start for start, end, _ in rank_intervals) for rank_intervals in intervals]
    return Timeline(intervals=intervals, makespan=makespan, bubble=[1 - b / makespan for b in busy],
                    peak_in_flight=[peak_in_flight(p) for p in programs])


def peak_in_flight(program: list[Action]) -> int:
    """Most microbatches with activations held at once: forward done in some chunk, that backward not yet."""
    held: dict[int, int] = {}
    peak = 0
    for a in program:
        if a.kind == "forward":
            held[a.microbatch] = held.get(a.microbatch, 0) + 1
            peak = max(peak, len(held))
        elif a.kind == "backward":
            held[a.microbatch] -= 1
            if not held[a.microbatch]:
                del held[a.microbatch]
    return peak


def bubble_formula(schedule: str, pp: int, microbatches: int, virtual: int = 1) -> float:
    """Idle fraction of the ideal schedule with equal stages: (p-1)/(m+p-1), the bubble (p-1)(t_f+t_b) over
    the makespan (m+p-1)(t_f+t_b); interleaving divides the bubble time by v: (p-1)/(v m + p - 1)."""
    v = virtual if schedule == "interleaved" else 1
    return (pp - 1) / (v * microbatches + pp - 1)
