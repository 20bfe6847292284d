"""The parallel layout as one object: this rank's model parts, gradient sync, schedule and shard specs.

    cfg = resolve_auto(cfg)                             # every "auto" choice made (engine/config.py)
    mesh = init_mesh(cfg)                               # dp x pp x tp process groups (one process: none)
    layout = parallelize(model, cfg, mesh)              # tensor.py, then pipeline.py, then data.py
    optimizer = layout.build_optimizer()                # ZeRO-1's sharded AdamW under dp with parallel.zero=1

    # one training step (engine.train.train_step): `rows` are this data-parallel rank's rows
    total = layout.global_target_count(rows)            # target tokens of the whole global batch
    loss = layout.forward_backward(rows, total)         # gradients accumulated; the step's loss on every rank
    layout.finish_gradients()                           # bucket reductions, tp and tied-embedding sums
    norm = layout.clip_gradients(max_norm)              # global norm over every shard
    optimizer.step()

    # forward only (validation, the scorer): results on every rank of this model replica; under pp the rows
    # run as up to parallel.microbatches pipelined microbatches (forward_microbatches)
    loss_sum = layout.summed_loss(rows)                 # summed token loss of a labelled batch (0-d fp32)
    hidden = layout.hidden_at(rows, row_index, positions)   # final-norm hidden states (N, d_model) fp32
    logits = layout.logits_at(rows, row_index, positions)   # full-vocabulary logits (N, vocab) fp32
    layout.data_parallel_sum(t)                         # sum a tensor over the dp replicas (in place)

    # state (the checkpointer, tests)
    specs = layout.shard_specs()                        # {local name: ShardSpec}: what this rank holds
    state = layout.full_state_dict()                    # the single-device state dict (collective)
    layout.summary()                                    # the degrees, schedule and ZeRO stage (run.json)

The layout owns its state, torchtitan-style: `layout.model` is this rank's part of the plain model under its
single-device names (tensor-parallel modules swapped in, other stages' modules deleted), `layout.parts` the
model chunks it runs in order (pipeline chunks; [model] without pipeline parallelism), `layout.pipeline` the
stages and schedule (None when pp = 1), `layout.sync` the data-parallel gradient buckets (None when dp = 1),
`layout.tensor` what tensor parallelism split. Nothing is hung on the model and no class is swapped. At world
size 1 every method is the plain single-device step: forward_backward is gradient accumulation over
train.grad_accum micro-batches, the sums and syncs do nothing.

Loss normalisation: every micro-batch's summed token loss is divided by the global batch's target count, so
that gradient accumulation and every layout reproduce the single-device step; the returned step loss is the
sum over pipeline stages (only the last has one) and over dp replicas.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from engine.batch import Batch
from engine.config import Config, unresolved
from engine.model import Transformer
from engine.optim import build_optimizer
from engine.parallel import comm
from engine.parallel.data import GradientSync
from engine.parallel.mesh import Mesh
from engine.parallel.pipeline import PipelineStages, run_forward, run_schedule, split_microbatches, split_stages
from engine.parallel.recompute import apply_recompute
from engine.parallel.specs import ShardSpec, parameter_specs
from engine.parallel.tensor import TensorParallelShards, apply_tensor_parallel
from engine.parallel.zero import ZeroAdamW, slice_square_sum

log = logging.getLogger(__name__)


class Layout:
    """This rank's part of one parallel layout; built by `parallelize`, used by the loop, the checkpointer
    and the scorer."""

    def __init__(self, cfg: Config, mesh: Mesh, model: Transformer, tensor: TensorParallelShards,
                 pipeline: PipelineStages | None):
        self.cfg, self.mesh, self.model, self.pipeline = cfg, mesh, model, pipeline
        local = {id(p) for p in model.parameters()}
        names = model.state_dict().keys()
        # Keep what tensor parallelism recorded for the modules this rank still holds.
        self.tensor = TensorParallelShards({n: d for n, d in tensor.dims.items() if n in names},
                                           [p for p in tensor.partial_grads if id(p) in local])
        self.parts: list[Transformer] = pipeline.chunks if pipeline is not None else [model]
        self.sync: GradientSync | None = None

    # ---- what the layout is -------------------------------------------------------------------------------
    def named_parameters(self):
        return self.model.named_parameters()

    def parameters(self):
        return self.model.parameters()

    @property
    def zero(self) -> bool:
        """Whether the optimizer state is sharded over dp (ZeRO-1)."""
        return self.sync is not None and self.sync.zero

    def summary(self) -> dict:
        p = self.cfg.parallel
        return {"dp": self.mesh.dp, "pp": self.mesh.pp, "tp": self.mesh.tp, "sp": p.sp and self.mesh.tp > 1,
                "virtual_stages": p.virtual_stages if self.mesh.pp > 1 else 1,
                "schedule": p.schedule if self.mesh.pp > 1 else "none",
                "microbatches": p.microbatches if self.mesh.pp > 1 else 1, "zero": int(self.zero),
                "recompute": p.recompute}

    def autocast(self):
        """The precision context of every forward (train.precision, already resolved)."""
        return precision_context(self.cfg.train.precision, self.mesh.device)

    def build_optimizer(self):
        """The optimizer for this layout: ZeRO-1's sharded AdamW under data parallelism with parallel.zero=1."""
        if self.zero:
            return ZeroAdamW(self.sync, self.cfg.optim)
        return build_optimizer(self.model, self.cfg)

    # ---- training -----------------------------------------------------------------------------------------
    def data_parallel_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the data-parallel replicas, in place (nothing to do at dp = 1)."""
        return comm.all_reduce(t, self.mesh.dp_group)

    def global_target_count(self, rows: Batch) -> int:
        """Target tokens of the global batch, from each replica's count of its rows."""
        count = torch.tensor(rows.num_target_tokens(), dtype=torch.int64, device=self.mesh.device)
        return int(self.data_parallel_sum(count))

    def forward_backward(self, rows: Batch, total_targets: int) -> torch.Tensor:
        """This rank's rows of one step (train.grad_accum rounds, each through the pipeline schedule under pp):
        gradients accumulated, each token's loss over `total_targets`. Returns the global step loss on every
        rank."""
        with self._shared_casts():
            if self.pipeline is not None:
                loss = self._pipeline_rounds(rows, total_targets)
                loss = comm.all_reduce(loss, self.mesh.pp_group)  # only the last stage's is non-zero
            else:
                loss = self._accumulate(rows, total_targets)
        return self.data_parallel_sum(loss)

    def _shared_casts(self):
        """Under bf16 autocast, one bf16 copy of each weight for the whole step: autocast caches its weight casts
        until the outermost autocast context exits, so a disabled one around the step keeps the cache across
        the microbatches (each would otherwise cast, and keep for its backward, its own copy of every weight)
        while backward runs without autocast."""
        if self.cfg.train.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.mesh.device.type, dtype=torch.bfloat16, enabled=False)

    def _accumulate(self, rows: Batch, total_targets: int) -> torch.Tensor:
        count = rows.tokens.shape[0]
        micro = max(1, -(-count // self.cfg.train.grad_accum))
        loss = torch.zeros((), device=self.mesh.device)
        for start in range(0, count, micro):
            mb = rows.slice_rows(start, start + micro).to(self.mesh.device)
            with self.autocast():
                part = self.model(mb, loss_reduction="sum") / max(total_targets, 1)
            if self.sync is not None and start + micro >= count:
                self.sync.arm()  # data parallelism reduces gradients during the step's last backward only
            part.backward()
            loss += part.detach()
        return loss

    def _pipeline_rounds(self, rows: Batch, total_targets: int) -> torch.Tensor:
        """grad_accum rounds of the schedule, each over parallel.microbatches microbatches; the summed loss on
        the last stage, zero elsewhere."""
        count, accum = rows.tokens.shape[0], self.cfg.train.grad_accum
        if count % accum:
            raise ValueError(f"pipeline: this rank's {count} rows do not split into train.grad_accum={accum} parts")
        size = count // accum
        loss = torch.zeros((), device=self.mesh.device)
        for start in range(0, count, size):
            # Gradients are final in the last round: only its last backward arms the data-parallel reduction.
            arm = self._arm_sync if self.sync is not None and start + size == count else None
            microbatches = split_microbatches(rows.slice_rows(start, start + size), self.cfg.parallel.microbatches)
            loss += run_schedule(self.pipeline, microbatches, loss_scale=1 / max(total_targets, 1),
                                 autocast=self.autocast, before_last_backward=arm)
        return loss

    def _arm_sync(self, chunk: int) -> None:
        self.sync.arm(self.parts[chunk].parameters())

    def finish_gradients(self) -> None:
        """After the step's last backward: finish the data-parallel bucket reductions, sum the partial gradients
        of sequence-parallel norms over tp and the tied embedding's over the first and last stage, then reduce
        those over dp too."""
        if self.sync is not None:
            self.sync.wait()
        grads = [p.grad for p in self.tensor.partial_grads if p.grad is not None]
        if grads and comm.group_size(self.mesh.tp_group) > 1:
            flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), self.mesh.tp_group)  # one call
            for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(summed.view_as(g))
        if self.pipeline is not None:
            self.pipeline.sync_tied_embedding()
        if self.sync is not None:
            self.sync.reduce_late()

    def clip_gradients(self, max_norm: float) -> float:
        """The global gradient norm over every shard, then (max_norm > 0) scale the gradients to at most max_norm.

        Each element counts once: tensor-sharded parameters on every tp rank (each holds a different part),
        replicated ones on tp rank 0; pipeline stages hold different layers, and the tied embedding counts on
        the first stage only; dp replicas hold the same reduced gradient, except under ZeRO-1 where each rank
        holds its slice. The squares are summed over the model-parallel group (and over dp with ZeRO-1).
        """
        counted = {id(p) for name, p in self.named_parameters()
                   if (name in self.tensor.dims or self.mesh.tp_rank == 0) and not self._is_tied_copy(p)}
        if self.zero:
            grads = [b.shard for b in self.sync.buckets if b.shard is not None]
            square = self.data_parallel_sum(slice_square_sum(self.sync, counted))
        else:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            square = torch.zeros((), device=self.mesh.device, dtype=torch.float32)
            for p in self.parameters():
                if p.grad is not None and id(p) in counted:
                    square += p.grad.detach().float().pow(2).sum()
        norm = comm.all_reduce(square, self.mesh.mp_group).sqrt()
        if max_norm > 0:
            # The same rule as torch.nn.utils.clip_grad_norm_: never scale up; 1e-6 guards a zero norm.
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale.to(g.dtype))
        return float(norm)

    def _is_tied_copy(self, p: nn.Parameter) -> bool:
        return self.pipeline is not None and self.pipeline.is_tied_copy(p)

    # ---- forward only -------------------------------------------------------------------------------------
    @torch.no_grad()
    def summed_loss(self, rows: Batch) -> torch.Tensor:
        """The summed token loss of a labelled batch of this rank's rows, as fp32 0-d on every rank of its model
        replica (tp and pp peers); sum it over dp with data_parallel_sum."""
        def finish(chunk: Transformer, batch: Batch, hidden: torch.Tensor | None, pick) -> torch.Tensor:
            return chunk(batch, hidden=hidden, loss_reduction="sum").float()

        return self._forward_only(rows, finish, ())

    @torch.no_grad()
    def hidden_at(self, rows: Batch, row_index: torch.Tensor, position_index: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (N, d_model) fp32 at the (row, position) pairs, on every rank of the replica."""
        def finish(chunk: Transformer, batch: Batch, hidden: torch.Tensor | None, pick) -> torch.Tensor:
            return chunk(batch, hidden=hidden, return_hidden=True)[pick].float()

        return self._forward_only(rows, finish, (len(row_index), self.cfg.model.d_model), (row_index, position_index))

    @torch.no_grad()
    def logits_at(self, rows: Batch, row_index: torch.Tensor, position_index: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (N, vocab) fp32 at the (row, position) pairs, on every rank of the
        replica (the head's slices gathered over tp)."""
        def finish(chunk: Transformer, batch: Batch, hidden: torch.Tensor | None, pick) -> torch.Tensor:
            return chunk.output(chunk(batch, hidden=hidden, return_hidden=True)[pick]).float()

        return self._forward_only(rows, finish, (len(row_index), self.cfg.model.vocab_size),
                                  (row_index, position_index))

    def forward_microbatches(self, rows: int) -> int:
        """Microbatches of a forward-only pass under pp: the most, up to parallel.microbatches, that split the
        rows evenly (the pipeline moves one activation shape)."""
        return max(m for m in range(1, self.cfg.parallel.microbatches + 1) if rows % m == 0)

    def _forward_only(self, rows: Batch, finish, shape: tuple[int, ...], pairs=None) -> torch.Tensor:
        """finish(chunk, batch, hidden, pick) on the last stage's output, `pick` the (row, position) indices of
        `pairs` inside that batch; under pp over microbatches, pipelined, the results summed (no pairs) or put
        back in pairs order, then broadcast from the last pipeline rank."""
        rows = rows.to(self.mesh.device)
        if pairs is not None:
            pairs = tuple(t.to(self.mesh.device) for t in pairs)
        if self.pipeline is None:
            with self.autocast():
                return finish(self.model, rows, None, pairs)
        count = self.forward_microbatches(rows.tokens.shape[0])
        size = rows.tokens.shape[0] // count
        picks, where = [None] * count, None
        if pairs is not None:
            owner = torch.div(pairs[0], size, rounding_mode="floor")
            where = [torch.nonzero(owner == m)[:, 0] for m in range(count)]
            picks = [(pairs[0][w] - m * size, pairs[1][w]) for m, w in enumerate(where)]
        calls = iter(picks)
        outs = run_forward(self.pipeline, split_microbatches(rows, count),
                           lambda chunk, batch, hidden: finish(chunk, batch, hidden, next(calls)),
                           autocast=self.autocast)
        out = torch.empty(shape, dtype=torch.float32, device=self.mesh.device)
        if outs is not None and pairs is None:
            out = torch.stack(outs).sum(0)
        elif outs is not None:
            out[torch.cat(where)] = torch.cat(outs)
        return comm.broadcast(out.contiguous(), self.mesh.pp_group, src=self.mesh.pp - 1)

    # ---- state --------------------------------------------------------------------------------------------
    def shard_specs(self) -> dict[str, ShardSpec]:
        """What this rank holds of every global tensor (local parameter name -> its global name, shape, region
        and whether this rank writes it)."""
        skipped = {id(p) for p in self.parameters() if self._is_tied_copy(p)}
        return parameter_specs(self.named_parameters(), self.tensor.dims, skipped, self.mesh)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device names and shapes (collective: all ranks): sharded tensors all-gathered over tp, then
        every tensor broadcast over pp from the stage that holds it. Tied embeddings come back as one tensor
        under both names, as in the single-device state dict (checkpoints store it once)."""
        dims, mesh, model_cfg = self.tensor.dims, self.mesh, self.cfg.model
        full = {name: comm.all_gather(t.detach(), mesh.tp_group, dims[name]) if name in dims else t.detach()
                for name, t in self.model.state_dict().items()}
        if self.pipeline is not None:
            local, full = full, {}
            with torch.device("meta"):
                shapes = Transformer(model_cfg).state_dict()
            for name, meta in shapes.items():
                if name == "output.weight" and model_cfg.tie_embeddings:
                    continue  # aliased below
                owner = self.pipeline.owner(name)
                tensor = (local[name] if owner == mesh.pp_rank else
                          torch.empty(meta.shape, dtype=meta.dtype, device=mesh.device))
                full[name] = comm.broadcast(tensor, mesh.pp_group, src=owner)
        if model_cfg.tie_embeddings:
            full["output.weight"] = full["tok_embeddings.weight"]
        return full


def precision_context(precision: str, device: torch.device):
    """bf16 autocast for train.precision="bf16", nothing for "fp32" (resolved values only)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parallelize(model: Transformer, cfg: Config, mesh: Mesh, materialize=None) -> Layout:
    """Apply the layout to a single-device model (sliced from its weights, so every layout starts equal), in
    torchtitan's order: tensor parallelism swaps modules, pipeline parallelism deletes the ones other stages
    hold, data parallelism hooks the remaining parameters' gradients. `cfg` must be resolved (resolve_auto).
    A model on the meta device is laid out as is; `materialize(model, tp_dims)` then replaces this rank's
    parameters by real ones before data parallelism hooks them, returning {id(old): new} (engine/build.py's
    shard-first build)."""
    left = unresolved(cfg)
    if left:
        raise ValueError(f"parallelize: {', '.join(left)} still 'auto'; resolve the config for this device first "
                         "(engine.config.resolve_auto)")
    apply_recompute(model, cfg.parallel.recompute)  # first: the later steps see the recomputed blocks
    tensor = TensorParallelShards()
    if mesh.tp > 1:
        tensor = apply_tensor_parallel(model, mesh, cfg.parallel.sp)
        log.info("tensor parallel over %d ranks%s", mesh.tp, " with sequence parallelism" if cfg.parallel.sp else "")
    pipeline = None
    if mesh.pp > 1:
        pipeline = split_stages(model, cfg, mesh)
        log.info("pipeline stage %d of %d: layers %s, schedule %s, %d microbatches", mesh.pp_rank, mesh.pp,
                 [f"{r.start}-{r.stop - 1}" for r in pipeline.layer_ranges], cfg.parallel.schedule,
                 cfg.parallel.microbatches)
    if materialize is not None:
        new = materialize(model, tensor.dims)
        tensor.partial_grads = [new.get(id(p), p) for p in tensor.partial_grads]
        if pipeline is not None and pipeline.tied_weight is not None:
            pipeline.tied_weight = new.get(id(pipeline.tied_weight), pipeline.tied_weight)
    layout = Layout(cfg, mesh, model, tensor, pipeline)
    if mesh.dp > 1:
        # Gradients that need a model-parallel sum first are reduced over dp after it (finish_gradients).
        late = list(layout.tensor.partial_grads)
        if pipeline is not None and pipeline.tied_weight is not None:
            late.append(pipeline.tied_weight)
        layout.sync = GradientSync(model, mesh.dp_group, bucket_mb=cfg.parallel.bucket_mb,
                                   zero=cfg.parallel.zero == 1, late=late, weight_decay=cfg.optim.weight_decay)
        log.info("data parallel over %d replicas, %d gradient buckets%s", mesh.dp, len(layout.sync.buckets),
                 ", ZeRO-1" if cfg.parallel.zero else "")
    return layout
