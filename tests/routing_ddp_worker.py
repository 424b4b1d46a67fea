"""Worker for test_routing_ddp: a few routed steps under `accelerate launch`, each rank dumps its adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from routing_helpers import make_rows, routing_args  # noqa: E402

from ilora.models.load import load_vlm  # noqa: E402
from ilora.routing.collator import mix_sources  # noqa: E402
from ilora.routing.trainer import RoutingTrainer  # noqa: E402


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    model, proc = load_vlm(model_dir)
    data = mix_sources([make_rows(16, 0)], [make_rows(8, 1, n_images=2)])
    args = routing_args(Path(out), max_steps=3, per_device_train_batch_size=2, ddp_backend="gloo")
    trainer = RoutingTrainer(model, args, train_dataset=data, processing_class=proc)
    trainer.train()
    rank = trainer.args.process_index
    state = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if "lora_" in n}
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"world{rank}.txt").write_text(str(trainer.args.world_size))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
