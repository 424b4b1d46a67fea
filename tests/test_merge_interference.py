"""`ilora analyze merge`: how much a max-magnitude merge changes each adapter's delta."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ilora.cli import main
from ilora.errors import IloraError
from ilora.merge import ops
from ilora.merge.interference import interference_stats, truncated_deltas
from ilora.merge.io import LoraAdapter
from merge_helpers import build_tiny_lm, make_adapter


def test_stats_of_a_hand_worked_pair():
    a = {"m": torch.tensor([[1.0, 0.0], [0.0, 2.0]])}
    b = {"m": torch.tensor([[0.0, 3.0], [0.0, -1.0]])}
    # Merged: [[1, 3], [0, 2]]; the tie at (1, 0) goes to the later adapter (b).
    stats = interference_stats([a, b])
    assert stats["norm"] == pytest.approx([math.sqrt(5), math.sqrt(10)])
    assert stats["share"] == pytest.approx([0.5, 0.5])
    assert stats["change"] == pytest.approx([3 / math.sqrt(5), 1.0])
    assert stats["cosine"][0][1] == pytest.approx(-2 / math.sqrt(50))
    assert stats["cosine"][0][0] == pytest.approx(1.0)


def test_identical_adapters_do_not_interfere_and_ties_go_to_the_later_one():
    d = {"x": torch.randn(5, 7), "y": torch.randn(3, 4)}
    stats = interference_stats([d, {k: v.clone() for k, v in d.items()}])
    assert stats["change"] == pytest.approx([0.0, 0.0])
    assert stats["share"] == pytest.approx([0.0, 1.0])
    assert stats["cosine"][0][1] == pytest.approx(1.0)


def test_share_counts_the_entries_the_merge_takes():
    gen = torch.Generator().manual_seed(0)
    deltas = [{"m": torch.randn(6, 9, generator=gen) * s} for s in (1.0, 2.0, 0.5)]
    stats = interference_stats(deltas)
    merged = ops.max_magnitude([d["m"] for d in deltas])
    taken = [int((merged == d["m"]).sum()) for d in deltas]  # random floats: no ties
    assert stats["share"] == pytest.approx([t / merged.numel() for t in taken])
    assert sum(stats["share"]) == pytest.approx(1.0)
    assert stats["change"] == pytest.approx([float((merged - d["m"]).norm() / d["m"].norm()) for d in deltas])


def test_bad_inputs_are_refused():
    with pytest.raises(IloraError, match="at least two"):
        interference_stats([{"m": torch.ones(2, 2)}])
    with pytest.raises(IloraError, match="other modules"):
        interference_stats([{"m": torch.ones(2, 2)}, {"n": torch.ones(2, 2)}])


def test_truncation_at_keep_1_is_the_adapters_delta_and_the_cli_writes_json(tmp_path, capsys):
    base = build_tiny_lm(tmp_path / "base")
    first, second = make_adapter(base, tmp_path / "a", 0), make_adapter(base, tmp_path / "b", 1)
    adapter = LoraAdapter(first)
    full = truncated_deltas(first, keep=1.0)
    assert set(full) == set(adapter.modules)
    for module, delta in full.items():
        torch.testing.assert_close(delta, adapter.load(module).dense(), rtol=1e-4, atol=1e-5)
    out = tmp_path / "interference.json"
    assert main(["analyze", "merge", str(first), str(second), "--keep", "0.5", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    expected = interference_stats([truncated_deltas(first, 0.5), truncated_deltas(second, 0.5)])
    assert saved["share"] == pytest.approx(expected["share"]) and saved["keep"] == 0.5
    assert "share of merged entries" in capsys.readouterr().out
    assert main(["analyze", "merge", str(first)]) == 2
    assert main(["analyze", "merge", str(first), str(second), "--keep", "1.5"]) == 2
