"""The single-device side of the tensor / pipeline / data-parallel / 3D equality tests: drawn model shapes,
packed batches, one reference training run in plain PyTorch whose loss, gradients and weights every layout
must reproduce, and the comparison, which trains the layout through engine.train.train_step itself."""
from __future__ import annotations

import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from engine.batch import IGNORE_INDEX, Batch
from engine.config import Config, DataConfig, ModelConfig, OptimConfig, ParallelConfig, resolve_auto
from engine.model import build_model
from engine.optim import build_optimizer

TOLERANCE = 1e-5  # fp32: only the order of partial sums differs between layouts
STEPS = 3


@st.composite
def model_shapes(draw, min_layers: int, tp: int = 1) -> dict:
    """A small model that tp can split, with at least `min_layers` blocks."""
    n_kv_heads = tp * draw(st.sampled_from([1, 2]))
    return dict(vocab_size=tp * draw(st.integers(4, 16)), d_model=draw(st.integers(4, 24)),
                n_layers=min_layers + draw(st.integers(0, 2)), n_heads=n_kv_heads * draw(st.sampled_from([1, 2])),
                n_kv_heads=n_kv_heads, head_dim=draw(st.sampled_from([2, 4])), d_ff=tp * draw(st.integers(1, 8)),
                mlp=draw(st.sampled_from(["swiglu", "geglu"])), tie_embeddings=draw(st.booleans()))


def draw_cases(strategy, n: int) -> list:
    """`n` examples of a strategy for one multi-process launch (process start-up is the cost, so the cases run
    together, without shrinking; each failure names its case). Hypothesis tries the simplest example first,
    then random ones."""
    drawn = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate])
    @given(strategy)
    def collect(case):
        drawn.append(case)

    collect()
    return drawn[:n]


def make_config(model: dict, seq_len: int, **parallel) -> Config:
    # Adam divides each gradient element by its own magnitude, so the fp32 rounding of a layout's different
    # summation order (a few 1e-4 relative on elements that are sums of cancelling terms) becomes a step
    # difference of that order times lr. lr 1e-3 and eps 1e-6 keep it small, and init_std 0.1 keeps the
    # weights of these 4-24 wide models well above it: with the default 0.02 / sqrt(2 n_layers) an output
    # projection of a 4-wide model is ~0.006 per element and its weights after 3 steps drift past 1e-5
    # relative although every gradient agrees to 1e-6. A constant rate: the reference steps at optim.lr.
    cfg = Config(model=ModelConfig(**{"init_std": 0.1, **model}), parallel=ParallelConfig(**parallel),
                 optim=OptimConfig(lr=1e-3, eps=1e-6, weight_decay=0.1, grad_clip=0.5, warmup_steps=0,
                                   schedule="constant"),
                 data=DataConfig(seq_len=seq_len)).validate("test case")
    return resolve_auto(cfg, cuda_available=False)


def make_batch(rows: int, seq_len: int, vocab: int, seed: int) -> Batch:
    """Rows of 1-3 packed segments with some padding and some positions without a loss."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, seq_len, (rows, 2), generator=gen)
    index = torch.arange(seq_len)
    segment_ids = (1 + (index >= starts[:, :1]).int() + (index >= starts[:, 1:]).int()).int()
    padding = torch.randint(0, seq_len // 3 + 1, (rows, 1), generator=gen)
    segment_ids = segment_ids.masked_fill(index >= seq_len - padding, 0)
    tokens = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    labels = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    no_loss = (segment_ids == 0) | (torch.rand(rows, seq_len, generator=gen) < 0.2)
    return Batch(tokens, labels.masked_fill(no_loss, IGNORE_INDEX), segment_ids)


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-12) -> float:
    """||got - want|| / ||want||, with ||want|| taken as at least `floor`."""
    return float((got.detach() - want.detach()).norm() / want.detach().norm().clamp(min=floor))


def reference_run(cfg: Config, batch: Batch, seed: int) -> dict:
    """Single device, plain PyTorch: STEPS AdamW steps on the same batch with clipping; every step's loss and
    gradient norm, the first step's (clipped) gradients, and the final weights."""
    model = build_model(cfg.model, seed)
    optimizer = build_optimizer(model, cfg)
    total = batch.num_target_tokens()
    out = {"losses": [], "grad_norms": []}
    for step in range(STEPS):
        loss = model(batch, loss_reduction="sum") / total
        loss.backward()
        out["losses"].append(loss.detach())
        out["grad_norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out["weights"] = {n: t.clone() for n, t in model.state_dict().items()}
    return out


class Worst:
    """The largest relative error seen per quantity, with where it was."""

    def __init__(self):
        self.errors: dict[str, tuple[float, str]] = {}

    def note(self, quantity: str, got: torch.Tensor, want: torch.Tensor, where: str = "", floor: float = 1e-12) -> None:
        err = relative_error(got, want, floor)
        if err >= self.errors.get(quantity, (-1.0, ""))[0]:
            self.errors[quantity] = (err, where)

    def failures(self, context: str) -> list[str]:
        return [f"{context}: {q} {where} relative error {err:.2e}" for q, (err, where) in self.errors.items()
                if not err < TOLERANCE]


def compare_layout(case: dict, mesh) -> list[str]:
    """Train the case's layout for STEPS steps and list every quantity (loss, gradients, gradient norm, final
    weights) further than TOLERANCE from the single device."""
    from engine.parallel import parallelize

    cfg = make_config(case["model"], case["seq_len"], **case["parallel"])
    cfg.train.grad_accum = case.get("grad_accum", 1)
    batch = make_batch(case["rows"], case["seq_len"], cfg.model.vocab_size, case["seed"])
    layout = parallelize(build_model(cfg.model, case["seed"]), cfg, mesh)
    worst = Worst()
    compare_training(layout, batch, reference_run(cfg, batch, case["seed"]), worst)
    return worst.failures(f"rank {mesh.rank} case {case}")


def compare_training(layout, batch: Batch, want: dict, worst: Worst) -> None:
    """STEPS calls of the training loop's own train_step on this rank's rows of `batch`, noted against the
    reference run `want`."""
    from engine.data_source import rank_rows
    from engine.train import train_step

    mesh = layout.mesh
    optimizer = layout.build_optimizer()
    rows = rank_rows(batch, mesh.dp_rank, mesh.dp)
    for step in range(STEPS):
        stats = train_step(layout, optimizer, rows, step)
        worst.note("loss", torch.tensor(stats["loss"]), want["losses"][step], f"step {step}")
        worst.note("grad_norm", torch.tensor(stats["grad_norm"]), want["grad_norms"][step], f"step {step}")
        if step == 0:
            # Relative 1e-5, but never finer than 1e-3 of the whole gradient's norm: a query/key projection whose
            # segments are a token or two gets a gradient of pure rounding noise (1e-10 of the whole) that no
            # two summation orders share.
            floor = 1e-3 * float(torch.stack([g.norm() for g in want["grads"].values()]).norm())
            for name, grad in full_gradients(layout).items():
                worst.note("gradient", grad, want["grads"][name], name, floor)
    weights = layout.full_state_dict()
    assert weights.keys() == want["weights"].keys(), sorted(set(weights) ^ set(want["weights"]))
    for name, got in weights.items():
        worst.note("weights", got, want["weights"][name], name)


def full_gradients(layout) -> dict[str, torch.Tensor]:
    """This rank's parameters' reduced (and clipped) gradients after a step, gathered over tp to their
    single-device shapes; under ZeRO-1 from every rank's bucket slices (collective)."""
    from engine.parallel import comm

    mesh, dims = layout.mesh, layout.tensor.dims
    grads = {id(p): p.grad for p in layout.parameters()}
    if layout.zero:
        for bucket in layout.sync.buckets:
            flat = comm.all_gather(bucket.shard, mesh.dp_group, 0)
            for p, offset in zip(bucket.params, bucket.offsets):
                grads[id(p)] = flat[offset:offset + p.numel()].view_as(p)
    return {name: comm.all_gather(grads[id(p)], mesh.tp_group, dims[name]) if name in dims else grads[id(p)]
            for name, p in layout.named_parameters()}
