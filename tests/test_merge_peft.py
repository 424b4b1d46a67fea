"""peft:* baselines equal PEFT's own add_weighted_adapter; a tiny VLM merges end to end."""

from __future__ import annotations

import pytest
import torch
from merge_helpers import build_tiny_lm, make_adapter

from ilora.merge import merge_adapters
from ilora.merge.peft_types import DENSITY_TYPES, PEFT_TYPES


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_pair")
    base = build_tiny_lm(root / "base")
    return base, make_adapter(base, root / "a", 1), make_adapter(base, root / "b", 2, alpha=8)


def peft_directly(base, adapters, combination_type):
    """What a user of PEFT writes by hand: equal weights 1.0, density 0.5, default svd rank."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="x")
    model.load_adapter(adapters[1], adapter_name="y")
    torch.manual_seed(0)
    extra = {"density": 0.5} if combination_type in DENSITY_TYPES else {}
    model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "combined", combination_type=combination_type, **extra)
    with torch.no_grad():
        return {
            f"{name}.weight": module.get_delta_weight("combined")
            for name, module in model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and "combined" in module.lora_A
        }


@pytest.mark.parametrize("combination_type", PEFT_TYPES)
def test_peft_types_equal_calling_peft(pair, combination_type):
    base, a, b = pair
    ours = merge_adapters([a, b], f"peft:{combination_type}", base=base, progress=False)
    theirs = peft_directly(base, [a, b], combination_type)
    assert set(ours.deltas) == set(theirs) and len(theirs) == 14
    for key, delta in theirs.items():
        assert torch.equal(ours.deltas[key], delta.float()), key
    recorded = ours.meta["options"]["add_weighted_adapter"]
    assert recorded["combination_type"] == combination_type and recorded["weights"] == [1.0, 1.0]
    assert recorded.get("density") == (0.5 if combination_type in DENSITY_TYPES else None)


def test_peft_linear_differs_from_delta_task_arithmetic(pair):
    """PEFT's non-SVD types combine A and B separately (PEFT issue 3004), not the products."""
    base, a, b = pair
    peft_linear = merge_adapters([a, b], "peft:linear", base=base, progress=False)
    ours = merge_adapters([a, b], "task_arithmetic", progress=False)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(peft_linear.deltas[key], ours.deltas[key], atol=1e-3)


def test_tiny_vlm_merges_all_parts(tiny_vlm_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from ilora.models.load import load_model, lora_target_modules

    targets = lora_target_modules(load_model(tiny_vlm_dir))
    adapters = [make_adapter(tiny_vlm_dir, tmp_path / f"vlm{i}", seed=i, r=4, alpha=8, targets=targets) for i in (1, 2)]
    state = merge_adapters(adapters, out=tmp_path / "m", base=tiny_vlm_dir, save_model=True, progress=False)
    assert {key.removesuffix(".weight") for key in state.deltas} == set(targets)
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        assert any(part in key for key in state.deltas), part
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "m" / "model")
    base = load_model(tiny_vlm_dir)
    assert type(merged) is type(base)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    merged_params, base_params = dict(merged.named_parameters()), dict(base.named_parameters())
    for key, base_param in base_params.items():
        expected = base_param + state.deltas[key] if key in state.deltas else base_param
        torch.testing.assert_close(merged_params[key], expected, atol=1e-6, rtol=1e-6)
