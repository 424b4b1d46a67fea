"""RegMean's time and memory on one module at llava-interleave-qwen-7b shapes vs a small module.

Prints, measured in one run, for ``regmean`` and ``regmean_lowrank`` on a down_proj
(3584 x 18944: an 18944-wide Gram, 1.34 GiB in float32) and a q_proj (3584 x 3584), each with
``--adapters`` synthetic rank-``--rank`` adapters and task and general Grams: the merge's wall
and CPU time, the time spent producing the Grams (as reading them from disk would; excluded
from the merge time), the process's peak RSS and its rise over the RSS before the merge, next
to the estimate from the methods' docstrings (two ``n x n`` float32 sums, one more ``n x n``
matrix, a few ``out x n`` ones).

Each case runs in a fresh process, so its peak RSS is its own. A Gram is ``XᵀX / N`` of
``--rows`` random rows (regenerated per call from a seed, so no Gram is held outside the
method), plus a small diagonal so that every Gram is positive definite; nothing is written.

    python benchmarks/bench_regmean.py                 # both modules, both methods
    python benchmarks/bench_regmean.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import time

import torch

SHAPES = {
    "model.language_model.layers.0.mlp.down_proj": (3584, 18944),
    "model.language_model.layers.0.self_attn.q_proj": (3584, 3584),
}


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_case(
    method_name: str, module: str, shape: tuple[int, int], rank: int, n_adapters: int, rows: int, threads: int, queue
) -> None:
    """One merge in this (fresh) process; reports times and memory through ``queue``."""
    from ilora.merge.io import LoraAdapter, LowRankDelta
    from ilora.merge.registry import get_method

    torch.set_num_threads(threads)
    out, inp = shape
    gram_seconds = [0.0]

    class SyntheticGrams:
        """Grams made on request from seeded rows, as ``AdapterGrams`` reads them from disk."""

        def __init__(self, seed: int):
            self.seed, self.rows = seed, {"task": 1, "general": 1}

        def _make(self, offset: int) -> torch.Tensor:
            start = time.perf_counter()
            x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(self.seed + offset))
            gram = (x.T @ x).div_(rows)
            gram.diagonal().add_(1e-2)
            gram_seconds[0] += time.perf_counter() - start
            return gram

        def task(self, _module: str) -> torch.Tensor:
            return self._make(0)

        def general(self, _module: str) -> torch.Tensor:
            return self._make(1)

    class SyntheticAdapter(LoraAdapter):
        """A rank-``rank`` LoRA of one module, held in memory (no folder)."""

        def __init__(self, seed: int):
            gen = torch.Generator().manual_seed(seed)
            decay = torch.exp(-2 * torch.arange(rank) / rank)
            self.delta = LowRankDelta(
                torch.randn(out, rank, generator=gen) * decay * 0.02,
                torch.randn(rank, inp, generator=gen) / math.sqrt(inp),
                2.0,
            )
            self.path, self.seed = None, seed

        @property
        def modules(self) -> dict[str, tuple[int, int]]:
            return {module: shape}

        def load(self, _module: str) -> LowRankDelta:
            return self.delta

        def grams(self) -> SyntheticGrams:
            return SyntheticGrams(1000 * self.seed)

    adapters = [SyntheticAdapter(seed) for seed in range(1, n_adapters + 1)]
    method = get_method(method_name)
    before = rss_gib()
    start, cpu_start = time.perf_counter(), time.process_time()
    _, delta, record, sums = next(iter(method.run(adapters, {module: shape})))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del delta, sums
    queue.put(
        {"wall": wall, "cpu": cpu, "gram_s": gram_seconds[0], "before": before, "peak": rss_gib(), "record": record}
    )


def estimate_gib(method_name: str, shape: tuple[int, int], float64_solve_bytes: int = 1 << 30) -> float:
    """The docstrings' estimate: two n x n float32 sums, one more n x n matrix (the Gram being
    added; regmean's system, float64 where it fits), the out x n delta sum and regmean's solution
    (in the solve's dtype, then a float32 copy); library workspaces not counted."""
    out, inp = shape
    solve_bytes = 8 if method_name == "regmean" and 8 * inp * inp <= float64_solve_bytes else 4
    third = max(4, solve_bytes) * inp * inp if method_name == "regmean" else 4 * inp * inp
    solution = (solve_bytes + 4) * out * inp if method_name == "regmean" else 0
    return (2 * 4 * inp * inp + third + 4 * out * inp + solution) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rows", type=int, default=128, help="rows behind each synthetic Gram")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default="regmean,regmean_lowrank")
    args = parser.parse_args()
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; threads={args.threads}; "
        f"{args.adapters} adapters r={args.rank}, task + general Grams each"
    )
    ctx = mp.get_context("spawn")
    for module, shape in SHAPES.items():
        for method_name in args.methods.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(
                target=run_case,
                args=(method_name, module, shape, args.rank, args.adapters, args.rows, args.threads, queue),
            )
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"bench_regmean: {method_name} on {shape} died (exit code {proc.exitcode})")
            r = queue.get()
            rec = r["record"]
            solve = rec.get("dtype", "float64 (R x R)")
            print(
                f"[{method_name:15s} {shape[0]}x{shape[1]}] merge {r['wall'] - r['gram_s']:6.1f} s wall "
                f"({r['cpu']:.1f} s CPU incl. Grams; making the Grams took {r['gram_s']:.1f} s), solver {rec['solver']} "
                f"in {solve}{', rank ' + str(rec['rank']) if 'rank' in rec else ''}; peak RSS {r['peak']:.2f} GiB, "
                f"+{r['peak'] - r['before']:.2f} GiB over the {r['before']:.2f} GiB before the merge "
                f"(estimate {estimate_gib(method_name, shape):.2f} GiB)",
                flush=True,
            )


if __name__ == "__main__":
    main()
