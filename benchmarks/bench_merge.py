"""Merge speed and memory on llava-interleave-qwen-7b module shapes, synthetic rank-128 adapters.

Prints, measured in one run:
  1. one 4096x4096 module, two adapters: PEFT ``add_weighted_adapter(svd)`` vs our I-LoRA
     merge of the same adapters (and our factorised SVD alone);
  2. every module of the model (or a ``--quick`` subset), four adapters, one-shot and then
     iterative (one adapter at a time): wall time and peak RSS, beside the time a plain
     torch matmul of the same matmul-FLOP count takes in the same process.

Shapes only (no weights are downloaded): Qwen2-7B LM (hidden 3584, intermediate 18944, 28
layers, k/v width 512), SigLIP so400m tower (hidden 1152, intermediate 4304, 26 layers),
projector 1152->3584->3584. Adapter factors are random with a decaying spectrum, generated
per module on the fly (as if streamed from disk); each phase runs in a fresh process so
its peak RSS is its own. The merged deltas are computed and dropped, not written (a full
merged state is ~28 GB of float32).

    python benchmarks/bench_merge.py            # everything (several minutes on 2 cores)
    python benchmarks/bench_merge.py --quick    # 2 LM + 2 vision layers + projector
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import time

import torch

LM, VISION, PROJECTOR = "model.language_model", "model.vision_tower.vision_model.encoder", "model.multi_modal_projector"


def module_shapes(lm_layers: int = 28, vision_layers: int = 26) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of every linear layer llava-interleave-qwen-7b puts LoRA on."""
    h, ffn, kv, vh, vffn = 3584, 18944, 512, 1152, 4304
    shapes = {}
    for i in range(lm_layers):
        p = f"{LM}.layers.{i}"
        shapes |= {f"{p}.self_attn.q_proj": (h, h), f"{p}.self_attn.k_proj": (kv, h), f"{p}.self_attn.v_proj": (kv, h)}
        shapes |= {f"{p}.self_attn.o_proj": (h, h), f"{p}.mlp.gate_proj": (ffn, h), f"{p}.mlp.up_proj": (ffn, h)}
        shapes[f"{p}.mlp.down_proj"] = (h, ffn)
    for i in range(vision_layers):
        p = f"{VISION}.layers.{i}"
        shapes |= {f"{p}.self_attn.{n}": (vh, vh) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
        shapes |= {f"{p}.mlp.fc1": (vffn, vh), f"{p}.mlp.fc2": (vh, vffn)}
    shapes |= {f"{PROJECTOR}.linear_1": (h, vh), f"{PROJECTOR}.linear_2": (h, h)}
    return shapes


def synthetic_lora(out: int, inp: int, rank: int, seed: int):
    """A LowRankDelta with Kaiming-like A and a B whose columns decay (like trained adapters)."""
    from ilora.merge.io import LowRankDelta

    gen = torch.Generator().manual_seed(seed)
    decay = torch.exp(-2 * torch.arange(rank) / rank)
    lora_B = torch.randn(out, rank, generator=gen) * decay * 0.02
    lora_A = torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
    return LowRankDelta(lora_B, lora_A, scale=2.0)


def matmul_floor(flops: float, max_seconds: float = 60.0) -> tuple[float, float, float]:
    """Seconds a plain 4096x4096 @ 4096x512 matmul loop takes for ``flops``.

    The loop runs the full count, or for ``max_seconds`` when that is shorter, and the time
    is scaled to ``flops`` at the rate it measured.

    Returns:
        ``(floor seconds, GFLOP/s, seconds actually timed)``.
    """
    a, b = torch.randn(4096, 4096), torch.randn(4096, 512)
    per = 2 * 4096 * 4096 * 512
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while reps < max(1, round(flops / per)) and time.perf_counter() - start < max_seconds:
        a @ b
        reps += 1
    seconds = time.perf_counter() - start
    return seconds * flops / (reps * per), reps * per / seconds / 1e9, seconds


def merge_phase(kind: str, shapes: dict[str, tuple[int, int]], rank: int, n_adapters: int, threads: int, queue) -> None:
    """One phase in its own process: stream every module; report time, RSS, FLOPs, floor."""
    from torch.utils.flop_counter import FlopCounterMode
    from tqdm import tqdm

    from ilora.merge.io import DenseDelta
    from ilora.merge.registry import get_method

    torch.set_num_threads(threads)
    method = get_method("ilora")
    counter = FlopCounterMode(display=False)
    start = time.perf_counter()
    with counter:
        for index, (module, (out, inp)) in enumerate(tqdm(shapes.items(), desc=kind, unit="module", leave=False)):
            adapters = [synthetic_lora(out, inp, rank, seed=1000 * a + index) for a in range(n_adapters)]
            if kind == "one-shot":
                method.merge_module(module, adapters)
            else:
                merged, _ = method.merge_module(module, adapters[:2])
                for adapter in adapters[2:]:
                    merged, _ = method.merge_module(module, [DenseDelta(merged), adapter])
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    flops = counter.get_total_flops()
    queue.put((seconds, peak_gb, flops, *matmul_floor(flops)))


def run_phase(*args) -> tuple:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=merge_phase, args=(*args, queue), daemon=True)
    proc.start()
    result = queue.get()
    proc.join()
    return result


def per_module_comparison(size: int, rank: int, threads: int) -> None:
    """PEFT's svd combination vs ours on one ``size x size`` module with two adapters."""
    from peft import LoraConfig, get_peft_model

    from ilora.merge import ops
    from ilora.merge.registry import get_method

    torch.set_num_threads(threads)
    adapters = [synthetic_lora(size, size, rank, seed=s) for s in (1, 2)]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"])
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(size, size, bias=False)), config, adapter_name="a0")
    model.add_adapter("a1", config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name, adapter in zip(("a0", "a1"), adapters):
            layer.lora_A[name].weight.copy_(adapter.lora_A)
            layer.lora_B[name].weight.copy_(adapter.lora_B)
    start = time.perf_counter()
    model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "svd", combination_type="svd")
    peft_s = time.perf_counter() - start

    method = get_method("ilora")
    method.merge_module("warm-up", adapters)
    times, svd_times = [], []
    for _ in range(5):
        start = time.perf_counter()
        method.merge_module("m", adapters)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for a in adapters:
            ops.factorized_svd(a.lora_B, a.lora_A, a.scale)
        svd_times.append(time.perf_counter() - start)
    ours, svd_only = min(times), min(svd_times)
    tag = f"[module {size}x{size}, 2 adapters r={rank}]"
    print(f"{tag} PEFT add_weighted_adapter(svd): {peft_s:.2f} s")
    print(f"{tag} ours, full I-LoRA merge (SVDs, truncation, max-magnitude ΔW): {ours * 1e3:.1f} ms -> {peft_s / ours:.0f}x")
    print(f"{tag} ours, factorised SVDs only: {svd_only * 1e3:.1f} ms -> {peft_s / svd_only:.0f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 LM layers, 2 vision layers and the projector")
    parser.add_argument("--phases", default="one-shot,iterative", help="comma list of one-shot, iterative")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument("--skip-peft", action="store_true", help="skip the per-module PEFT comparison")
    args = parser.parse_args()

    shapes = module_shapes(2, 2) if args.quick else module_shapes()
    params = sum(o * i for o, i in shapes.values())
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; threads={args.threads}; modules={len(shapes)}; "
        f"dense ΔW {params / 1e9:.2f}G elements ({4 * params / 2**30:.1f} GiB float32)"
    )
    if not args.skip_peft:
        per_module_comparison(4096, args.rank, args.threads)
    for kind in args.phases.split(","):
        seconds, peak_gb, flops, floor, gflops, timed = run_phase(kind, shapes, args.rank, args.adapters, args.threads)
        print(
            f"[{kind}, {args.adapters} adapters r={args.rank}, {len(shapes)} modules] "
            f"wall {seconds:.1f} s, peak RSS {peak_gb:.2f} GiB; matmul floor {floor:.1f} s ({flops / 1e12:.2f} TFLOP at {gflops:.0f} GFLOP/s, rate timed over {timed:.0f} s) "
            f"-> {seconds / floor:.2f}x the floor",
            flush=True,
        )


if __name__ == "__main__":
    main()
