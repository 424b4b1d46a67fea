"""ilora.merge: merge LoRA adapters into one weight delta (I-LoRA and baselines).

    from ilora.merge import merge_adapters
    state = merge_adapters(["task_a", "task_b"], method="ilora", keep=0.8)
    state.deltas["model.layers.0.self_attn.q_proj.weight"]  # float32 ΔW
    later = merge_adapters([state, "task_c"])  # iterative: fold a new adapter in

Names resolve lazily so that ``ilora --help`` (which imports ``ilora.merge.cli``) stays
fast without torch.
"""

import importlib

_EXPORTS = {
    "merge_adapters": "engine",
    "check_compatible": "engine",
    "apply_merged_state": "export",
    "export_lora": "export",
    "load_vlm_merged": "export",
    "save_merged_model": "export",
    "LoraAdapter": "io",
    "MergedState": "io",
    "load_merged_state": "io",
    "open_input": "io",
    "MergeMethod": "method",
    "available_methods": "registry",
    "get_method": "registry",
    "register": "method",
}
__all__ = [name for name in sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ilora.merge' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ilora.merge.{_EXPORTS[name]}"), name)
