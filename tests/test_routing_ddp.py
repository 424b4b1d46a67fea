"""Two CPU processes (DDP over gloo, launched with torchrun): both ranks end with identical adapters.

`accelerate launch --cpu` runs a single process on this accelerate version, so the test uses
`torch.distributed.run`; the Trainer goes through accelerate's DDP path either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file


def test_two_process_ranks_hold_identical_adapters(tiny_vlm_dir, tmp_path):
    worker = Path(__file__).with_name("routing_ddp_worker.py")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(worker), str(tiny_vlm_dir), str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "world0.txt").read_text() == "2"
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) == 56
    assert any(bool(t.abs().sum() > 0) for n, t in rank0.items() if "lora_B" in n)  # it trained
    for name in rank0:
        assert (rank0[name] == rank1[name]).all(), name
