"""Import and export stream: the peak resident memory (VmHWM) of the weight import, and of the weight export
(from a one-device and from a tp=2 checkpoint), in a fresh process, stays under twice the largest tensor
(fp32) above what that process held after importing torch and the engine."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from engine.hf.config import hf_name

VOCAB, D = 8192, 1024  # the embedding, 32 MiB in fp32, is the largest tensor by far


HWM = """
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
"""
LARGEST = VOCAB * D * 4


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """An HF folder whose tensors together are far above the bound: (folder, total fp32 bytes)."""
    folder = tmp_path_factory.mktemp("big")
    cfg = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": 64,
           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128,
           "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, D, generator=g), "model.norm.weight": torch.ones(D)}
    for i in range(4):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": torch.ones(D),
                        p + "post_attention_layernorm.weight": torch.ones(D),
                        p + "mlp.gate_proj.weight": torch.randn(64, D, generator=g),
                        p + "mlp.up_proj.weight": torch.randn(64, D, generator=g),
                        p + "mlp.down_proj.weight": torch.randn(D, 64, generator=g)})
        for name in ("q", "k", "v", "o"):
            tensors[f"{p}self_attn.{name}_proj.weight"] = torch.randn(D, D, generator=g)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    total = sum(t.numel() for t in tensors.values()) * 4
    assert total > 2 * LARGEST  # the bound is below the model: holding it whole would fail the tests
    return folder, total


def peak_growth(script: str) -> int:
    """Run `script` (which prints {"before": VmHWM, "after": VmHWM}) in a fresh process: the peak's growth."""
    out = subprocess.run([sys.executable, "-c", HWM + textwrap.dedent(script)], capture_output=True, text=True,
                         check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    return rss["after"] - rss["before"]


def test_import_peak_memory_is_two_tensors(big_folder, tmp_path):
    folder, _ = big_folder
    grown = peak_growth(f"""
        import json, torch
        from pathlib import Path
        from engine.config import Config
        from engine.hf.config import model_config_from_llama
        from engine.hf.import_ import _our_sources, stream_weights
        import engine.model, engine.checkpoint

        folder = Path({str(folder)!r})
        cfg = Config(model=model_config_from_llama(json.loads((folder / "config.json").read_text()), folder))
        sources = _our_sources(folder, cfg.model)
        before = hwm()
        stream_weights(sources, Path({str(tmp_path / "run")!r}), cfg, torch.float32, {{"dp": 1, "pp": 1, "tp": 1}},
                       {{"config": cfg.to_dict()}})
        print(json.dumps({{"before": before, "after": hwm()}}))
    """)
    print(f"import: peak RSS grew {grown / 2**20:.1f} MiB (bound {2 * LARGEST / 2**20:.0f} MiB)")  # shown with -s
    assert grown < 2 * LARGEST, f"import grew the peak RSS by {grown / 2**20:.1f} MiB; bound {2 * LARGEST / 2**20} MiB"


@pytest.mark.parametrize("tp", [1, 2])
def test_export_peak_memory_is_two_tensors(big_folder, tmp_path, tp):
    from engine.checkpoint import load_model_state
    from engine.config import Config
    from engine.hf.config import model_config_from_llama
    from engine.hf.import_ import _our_sources, stream_weights

    folder, _ = big_folder
    cfg = Config(model=model_config_from_llama(json.loads((folder / "config.json").read_text()), folder))
    step = stream_weights(_our_sources(folder, cfg.model), tmp_path / "run", cfg, torch.float32,
                          {"dp": 1, "pp": 1, "tp": tp}, {"config": cfg.to_dict()})
    out = tmp_path / "model.safetensors"
    grown = peak_growth(f"""
        import json
        from pathlib import Path
        from engine.checkpoint import load_meta
        from engine.hf.export import stream_weights
        import engine.model

        step = Path({str(step)!r})
        index = load_meta(step)
        before = hwm()
        stream_weights(step, index, True, Path({str(out)!r}))
        print(json.dumps({{"before": before, "after": hwm()}}))
    """)
    print(f"export from tp={tp}: peak RSS grew {grown / 2**20:.1f} MiB (bound {2 * LARGEST / 2**20:.0f} MiB)")
    assert grown < 2 * LARGEST, f"export grew the peak RSS by {grown / 2**20:.1f} MiB; bound {2 * LARGEST / 2**20} MiB"
    from safetensors.torch import load_file

    written, state = load_file(str(out)), load_model_state(step)  # and it wrote the checkpoint's weights
    assert written.keys() == {hf_name(n) for n in state}
    assert all(torch.equal(written[hf_name(n)], t) for n, t in state.items())
