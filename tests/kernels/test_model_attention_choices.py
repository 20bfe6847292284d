"""The model's flash-kernel choices (model.attention_tiles, model.attention_backward) reach the kernel and give
the PyTorch attention path's loss and gradients on the same weights and a packed batch; bad combinations are
refused by the config."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.batch import Batch
from engine.config import ConfigError, ModelConfig, load_config, resolve_auto
from engine.model import build_model
from kernels import attention as kernel

TORCH = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=48,
                    attention="torch", loss="torch")
SEGMENTS = torch.tensor([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], dtype=torch.int32)


def loss_and_grads(cfg: ModelConfig):
    model = build_model(cfg, seed=3)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    loss = model(Batch(tokens=tokens, labels=tokens.roll(-1, dims=1), segment_ids=SEGMENTS))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("tiles, backward", [("pointers", "split"), ("tma", "split"), ("pointers", "fused"),
                                             ("tma", "fused")])
def test_kernel_choices_match_the_torch_path(tiles, backward, monkeypatch):
    seen = []
    real = kernel.flash_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["tma"], kwargs["fused_backward"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "flash_attention", spy)
    ref_loss, ref_grads = loss_and_grads(TORCH)
    loss, grads = loss_and_grads(dataclasses.replace(TORCH, attention="triton", attention_tiles=tiles,
                                                     attention_backward=backward))
    assert seen == [(tiles == "tma", backward == "fused")] * TORCH.n_layers
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("flag", ["--model.attention_tiles=tma", "--model.attention_backward=fused"])
def test_kernel_choice_with_torch_attention_is_refused(flag):
    with pytest.raises(ConfigError, match=r"model\.attention.*model\.attention is torch"):
        load_config("configs/tiny.toml", ["--model.attention=torch", flag])


def test_kernel_choice_with_auto_attention_loads_and_resolves_on_cpu():
    """auto stays loadable on any machine: on the CPU it resolves to the PyTorch path, which has no tiles."""
    cfg = resolve_auto(load_config("configs/tiny.toml", ["--model.attention=auto", "--model.attention_tiles=tma"]),
                       cuda_available=False)
    assert (cfg.model.attention, cfg.model.attention_tiles) == ("torch", "tma")
