"""Merge speed and memory on llava-interleave-qwen-7b module shapes, synthetic rank-128 adapters.

Prints, measured in one run:
  1. one 4096x4096 module, two adapters: PEFT ``add_weighted_adapter(svd)`` vs our I-LoRA
     merge of the same adapters (and our factorised SVD alone);
  2. every module of the model (or a ``--quick`` subset), four adapters, one-shot and then
     iterative (one adapter at a time): merge time (and the wall time that also generates
     the synthetic adapters) and peak RSS, beside the time a plain torch matmul of the same
     matmul-FLOP count takes in the same process (FLOPs counted in a separate, untimed pass).

Shapes only (no weights are downloaded): Qwen2-7B LM (hidden 3584, intermediate 18944, 28
layers, k/v width 512), SigLIP so400m tower (hidden 1152, intermediate 4304, 26 layers),
projector 1152->3584->3584. Adapter factors are random with a decaying spectrum, generated
per module on the fly (as if streamed from disk); each phase runs in a fresh process so
its peak RSS is its own. The merged deltas are computed and dropped, not written (a full
merged state is ~28 GB of float32).

    python benchmarks/bench_merge.py            # everything (at --threads 1: one-shot ~5 min, iterative ~1 h)
    python benchmarks/bench_merge.py --quick    # 2 LM + 2 vision layers + projector
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue as queue_module
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


def matmul_rate(flops: float, max_seconds: float = 60.0) -> tuple[float, float, float]:
    """The rate of a plain 4096x4096 @ 4096x512 matmul loop, in wall and in CPU time.

    The loop runs ``flops`` worth of matmuls, or for ``max_seconds`` when that is shorter.

    Returns:
        ``(GFLOP/s by the wall clock, GFLOP/s by process CPU time, seconds timed)``.
    """
    a, b = torch.randn(4096, 4096), torch.randn(4096, 512)
    per = 2 * 4096 * 4096 * 512
    a @ b  # warm-up
    needed = max(1, round(flops / per)) if math.isfinite(flops) else math.inf
    reps, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while reps < needed and time.perf_counter() - start < max_seconds:
        a @ b
        reps += 1
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return reps * per / seconds / 1e9, reps * per / cpu_seconds / 1e9, seconds


def merge_phase(kind: str, shapes: dict[str, tuple[int, int]], rank: int, n_adapters: int, threads: int, queue) -> None:
    """One phase in its own process: stream every module; report times, RSS, FLOPs, floor.

    The timed pass runs uninstrumented. FLOPs are counted in a second, untimed pass:
    ``FlopCounterMode`` sends every torch op through Python (tens of µs each), which would
    otherwise be timed as merge work. A one-shot merge's FLOPs depend only on the module's
    shape, so that pass counts one module per shape; an iterative merge's depend on the data
    (the truncated SVD's iterations), so it counts every module.

    The matmul rate is sampled before the merge (10 s) and after it (the whole FLOP count,
    at most 60 s); the floor takes the faster sample, so a busy moment during one of them
    cannot make the floor look slow. Rates and times are taken by the wall clock and in
    process CPU time (the latter discounts time the process waited for a core).
    """
    from torch.utils.flop_counter import FlopCounterMode
    from tqdm import tqdm

    from ilora.merge.io import DenseDelta
    from ilora.merge.registry import get_method

    torch.set_num_threads(threads)
    method = get_method("ilora")

    def adapters_of(index: int, out: int, inp: int) -> list:
        return [synthetic_lora(out, inp, rank, seed=1000 * a + index) for a in range(n_adapters)]

    def merge(module: str, adapters: list) -> None:
        if kind == "one-shot":
            method.merge_module(module, adapters)
        else:
            merged, _ = method.merge_module(module, adapters[:2])
            for adapter in adapters[2:]:
                merged, _ = method.merge_module(module, [DenseDelta(merged), adapter])

    rate_before = matmul_rate(float("inf"), max_seconds=10.0)
    merge_seconds, merge_cpu, start = 0.0, 0.0, time.perf_counter()
    for index, (module, (out, inp)) in enumerate(tqdm(shapes.items(), desc=kind, unit="module", leave=False)):
        adapters = adapters_of(index, out, inp)  # as if read from disk: in the wall time, not the merge time
        begin, cpu_begin = time.perf_counter(), time.process_time()
        merge(module, adapters)
        merge_seconds += time.perf_counter() - begin
        merge_cpu += time.process_time() - cpu_begin
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    flops, per_shape = 0, {}
    for index, (module, (out, inp)) in enumerate(tqdm(shapes.items(), desc=f"{kind} FLOPs", unit="module", leave=False)):
        if kind == "one-shot" and (out, inp) in per_shape:
            flops += per_shape[out, inp]
            continue
        counter = FlopCounterMode(display=False)
        adapters = adapters_of(index, out, inp)
        with counter:
            merge(module, adapters)
        per_shape[out, inp] = counter.get_total_flops()
        flops += per_shape[out, inp]
    rate_after = matmul_rate(flops)
    queue.put(
        {
            "wall": seconds, "merge": merge_seconds, "merge_cpu": merge_cpu, "peak_gb": peak_gb, "flops": flops,
            "rate_before": rate_before, "rate_after": rate_after,
        }
    )


def run_phase(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=merge_phase, args=(*args, queue), daemon=True)
    proc.start()
    while True:  # a phase process that dies (killed, out of memory) must not leave us waiting
        try:
            result = queue.get(timeout=10)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise SystemExit(f"bench_merge: the {args[0]} phase process died (exit code {proc.exitcode})") from None
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
        r = run_phase(kind, shapes, args.rank, args.adapters, args.threads)
        (wall_before, cpu_before, _), (wall_after, cpu_after, timed) = r["rate_before"], r["rate_after"]
        rate, cpu_rate = max(wall_before, wall_after), max(cpu_before, cpu_after)
        floor, cpu_floor = r["flops"] / rate / 1e9, r["flops"] / cpu_rate / 1e9
        print(
            f"[{kind}, {args.adapters} adapters r={args.rank}, {len(shapes)} modules] "
            f"merge {r['merge']:.1f} s wall, {r['merge_cpu']:.1f} s CPU "
            f"(wall {r['wall']:.1f} s with generating the synthetic adapters), peak RSS {r['peak_gb']:.2f} GiB\n"
            f"  matmul floor {floor:.1f} s wall, {cpu_floor:.1f} s CPU ({r['flops'] / 1e12:.2f} TFLOP at {rate:.0f} GFLOP/s wall, "
            f"{cpu_rate:.0f} CPU: the faster of {wall_before:.0f}/{cpu_before:.0f} before the merge and "
            f"{wall_after:.0f}/{cpu_after:.0f} after it, timed over {timed:.0f} s)\n"
            f"  -> {r['merge'] / floor:.2f}x the floor by the wall clock ({r['wall'] / floor:.2f}x counting the generation), "
            f"{r['merge_cpu'] / cpu_floor:.2f}x in CPU time",
            flush=True,
        )


if __name__ == "__main__":
    main()
