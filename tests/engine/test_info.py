"""`flan info`: LaMDA-PT's shape holds 137.4B parameters in its blocks."""
import json

from flan.cli import main


def test_flan_137b_blocks_hold_137_4b(capsys):
    assert main(["info", "configs/flan-137b.toml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["blocks_parameters"] / 1e9, 1) == 137.4
    assert isinstance(info["parameters"], int) and info["parameters"] > info["blocks_parameters"]
    # 6N rule of thumb for the dense part (N = matmul parameters incl. the output projection).
    assert abs(info["training_flops_per_token"]["dense"] / (6 * 137.7e9) - 1) < 0.01


def test_tiny_is_a_few_million_parameters(capsys):
    main(["info", "configs/tiny.toml", "--json"])
    assert 1e6 < json.loads(capsys.readouterr().out)["parameters"] < 10e6
