"""Exact-match scoring of a predictor on general rows, overall and per question family."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm

from ilora.errors import IloraError

PredictFn = Callable[[list[dict[str, Any]]], list[str]]


def normalize_answer(text: str) -> str:
    """The matching form of an answer: stripped, lower-case, inner whitespace collapsed, trailing periods dropped.

    ``" Red. "`` and ``"red"`` match; ``"top-left"`` and ``"top left"`` do not.
    """
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").rstrip()


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for the default ``z``).

    Args:
        correct: successes.
        n: trials (0 gives the uninformative interval ``(0, 1)``).
        z: standard-normal quantile of the two-sided level.

    Returns:
        ``(low, high)`` bounds in [0, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    # At p = 0 or 1 one bound is exactly 0 or 1; say so rather than leave rounding residue.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def accuracy_stats(hits: list[bool], answers: list[str]) -> dict[str, float | int]:
    """Accuracy with its Wilson 95 % interval, and the majority-answer rate of the same rows.

    The majority rate is what always giving the group's most common answer would score
    (measured on the scored rows themselves, so a slightly optimistic prior).
    """
    n, correct = len(hits), sum(hits)
    low, high = wilson_interval(correct, n)
    majority = Counter(answers).most_common(1)[0][1] / n if n else 0.0
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95_low": low,
        "ci95_high": high,
        "majority_rate": majority,
    }


def batched(rows: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_general(
    predict_fn: PredictFn, rows: Iterable[dict[str, Any]], batch_size: int = 32, progress: bool = False
) -> dict[str, Any]:
    """Exact-match accuracy of ``predict_fn`` on ``rows``, overall and per ``task``.

    Args:
        predict_fn: maps a batch of rows (the row contract: ``images``, ``prompt``, ...)
            to one answer string per row.
        rows: a list of rows or a ``datasets.Dataset`` of them.
        batch_size: rows per ``predict_fn`` call.
        progress: show a tqdm bar.

    Returns:
        ``{"overall": stats, "per_task": {task: stats}}`` where ``stats`` holds ``n``,
        ``correct``, ``accuracy``, ``ci95_low`` / ``ci95_high`` (Wilson) and
        ``majority_rate``. Answers match after ``normalize_answer``.
    """
    if batch_size < 1:
        raise IloraError(f"batch_size={batch_size}: expected a positive integer")
    hits: dict[str, list[bool]] = defaultdict(list)
    answers: dict[str, list[str]] = defaultdict(list)
    total = len(rows) if hasattr(rows, "__len__") else None
    with tqdm(total=total, desc="general eval", disable=not progress) as bar:
        for batch in batched(rows, batch_size):
            predictions = list(predict_fn(batch))
            if len(predictions) != len(batch):
                raise IloraError(f"predict_fn returned {len(predictions)} answers for a batch of {len(batch)} rows")
            for row, predicted in zip(batch, predictions):
                expected = normalize_answer(row["answer"])
                hits[row["task"]].append(normalize_answer(str(predicted)) == expected)
                answers[row["task"]].append(expected)
            bar.update(len(batch))
    every_hit = [h for task in hits for h in hits[task]]
    every_answer = [a for task in answers for a in answers[task]]
    return {
        "overall": accuracy_stats(every_hit, every_answer),
        "per_task": {task: accuracy_stats(hits[task], answers[task]) for task in sorted(hits)},
    }


def accuracy_by_task(model, processor, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy of a VLM's greedy answers on general ``rows``, overall and per ``task``
    (:func:`score_general`'s record)."""
    from ilora.models.predict import generate_answers

    return score_general(lambda batch: generate_answers(model, processor, batch), rows)


def accuracy_table(scores: dict[str, Any]) -> str:
    """One line per question family of a :func:`score_general` record: accuracy, its 95% CI, the
    majority-answer rate and the count, after a header line."""
    lines = [f"{'family':<22}{'accuracy':>9}  {'95% CI':<15}{'majority':>9}{'n':>6}"]
    for name, s in [("overall", scores["overall"]), *sorted(scores["per_task"].items())]:
        ci = f"[{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]"
        lines.append(f"{name:<22}{s['accuracy']:>9.3f}  {ci:<15}{s['majority_rate']:>9.3f}{s['n']:>6}")
    return "\n".join(lines)
