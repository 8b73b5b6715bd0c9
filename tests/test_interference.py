"""lora-arith interference: cosines, energy shares in each other's column/row spaces and the
top modules, from the factors, checked against dense computations on tiny adapters."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_deltas

from lora_arith.lora.adapter_io import open_adapter
from lora_arith.lora.analysis import interference
from lora_arith.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _bases(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = int((S > 1e-6 * S.max()).sum())
    return U[:, :k], Vh[:k].T


def _dense_reference(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict:
    """The interference figures of X and Y from dense per-module deltas."""
    names = sorted(set(x) | set(y))
    flat = lambda d: torch.cat([d[n].double().flatten() if n in d else torch.zeros(0) for n in names])  # noqa: E731
    energy_x = sum(float(d.double().square().sum()) for d in x.values())
    energy_y = sum(float(d.double().square().sum()) for d in y.values())
    common = [n for n in names if n in x and n in y]
    column, row, chance_column = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    products = {}
    for name in common:
        X, Y = x[name].double(), y[name].double()
        products[name] = float((X * Y).sum())
        for direction, (a, b) in enumerate(((X, Y), (Y, X))):
            U, V = _bases(b)
            column[direction] += float((U @ U.T @ a).square().sum())
            row[direction] += float((a @ V @ V.T).square().sum())
            chance_column[direction] += float(a.square().sum()) * U.shape[1] / a.shape[0]
    scale = (energy_x * energy_y) ** 0.5
    return {
        "cosine": sum(products.values()) / scale,
        "column_share": (column[0] / energy_x, column[1] / energy_y),
        "row_share": (row[0] / energy_x, row[1] / energy_y),
        "chance_column": (chance_column[0] / energy_x, chance_column[1] / energy_y),
        "top": sorted(products, key=lambda n: -abs(products[n]))[:3],
        "contributions": {n: p / scale for n, p in products.items()},
        "flat_cosine": float(torch.nn.functional.cosine_similarity(flat(x), flat(y), dim=0)) if len(x) == len(y) else None,
    }


@pytest.fixture
def three_adapters(adapter_factory, tiny_llama, tmp_path):
    """a (rank 4); b = a + c, which overlaps a in part (rank 6); d: rank 2 on only some modules."""
    a = adapter_factory("a", seed=1)
    c = adapter_factory("c", seed=2, r=2)
    b = tmp_path / "b"
    assert run("combine", a, f"{c}:1.5", "-o", b).exit_code == 0
    d = adapter_factory("d", seed=3, r=2, target_modules=["q_proj", "up_proj"])
    return tiny_llama, [a, b, d]


def test_interference_matches_dense_computation(three_adapters):
    base, paths = three_adapters
    dense = [peft_deltas(base, path) for path in paths]
    opened = [open_adapter(path) for path in paths]
    pairs = interference(opened, top=3)
    assert [(p.first, p.second) for p in pairs] == [
        (opened[0].label, opened[1].label),
        (opened[0].label, opened[2].label),
        (opened[1].label, opened[2].label),
    ]
    for pair, (i, j) in zip(pairs, ((0, 1), (0, 2), (1, 2))):
        expected = _dense_reference(dense[i], dense[j])
        assert pair.cosine == pytest.approx(expected["cosine"], abs=1e-6)
        assert pair.column_share == pytest.approx(expected["column_share"], abs=1e-6)
        assert pair.row_share == pytest.approx(expected["row_share"], abs=1e-6)
        assert pair.chance_column == pytest.approx(expected["chance_column"], abs=1e-9)
        assert [m.name for m in pair.top_modules] == expected["top"]
        for module in pair.top_modules:
            assert module.contribution == pytest.approx(expected["contributions"][module.name], abs=1e-6)
        if expected["flat_cosine"] is not None:
            assert pair.cosine == pytest.approx(expected["flat_cosine"], abs=1e-5)
    # b contains a: all of a's energy lies in b's spaces; b's in a's only partly
    ab = pairs[0]
    assert ab.column_share[0] == pytest.approx(1.0, abs=1e-6) and ab.row_share[0] == pytest.approx(1.0, abs=1e-6)
    assert 0.1 < ab.column_share[1] < 0.999
    assert ab.cosine > 0.3


def test_interference_per_module_type_and_identical_adapters(adapter_factory):
    a = open_adapter(adapter_factory("x", seed=7))
    (pair,) = interference([a, a])
    assert pair.cosine == pytest.approx(1.0)
    assert set(pair.cosine_by_module_type) >= {"q_proj", "v_proj"}
    assert all(value == pytest.approx(1.0) for value in pair.cosine_by_module_type.values())
    assert pair.column_share == pytest.approx((1.0, 1.0)) and pair.row_share == pytest.approx((1.0, 1.0))


def test_interference_cli_prints_each_pair_and_writes_json(three_adapters, tmp_path):
    _, paths = three_adapters
    out = tmp_path / "interference.json"
    result = run("interference", *paths, "--top", "2", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output.count(" × ") == 3
    assert "column (output) space" in result.output and "row (input) space" in result.output
    assert "chance" in result.output and "overlap most in" in result.output
    record = json.loads(out.read_text())
    assert record["adapters"] == ["a", "b", "d"]  # basenames, no local paths
    assert len(record["pairs"]) == 3 and len(record["pairs"][0]["top_modules"]) == 2
    assert str(tmp_path) not in out.read_text()
    again = run("interference", *paths, "-o", out)
    assert again.exit_code != 0 and "--force" in again.output and "Traceback" not in again.output
    assert run("interference", *paths, "-o", out, "--force").exit_code == 0


def test_interference_needs_two(adapter_factory):
    result = run("interference", adapter_factory())
    assert result.exit_code != 0 and result.output.strip().startswith("Error: ") and "at least two" in result.output
