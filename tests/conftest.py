"""Shared fixtures: tiny models built from config (no model hub), once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny LLaVA-style VLM (SigLIP tower, projector, Qwen2 LM) saved as a HF folder."""
    from ilora.base.pretrain import tokenizer_corpus
    from ilora.models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm", seed=0, corpus=tokenizer_corpus())


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlm_dir):
    """``(model, processor)`` loaded from ``tiny_vlm_dir``; tests must not modify the model in place."""
    from ilora.models.load import load_vlm

    return load_vlm(tiny_vlm_dir)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models on a shared 2-core machine run faster and steadier."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
