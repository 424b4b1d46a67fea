"""Exact-match scoring: normalisation, Wilson intervals, and accuracy of known predictors."""

from __future__ import annotations

from collections import Counter

import pytest

from ilora.errors import IloraError
from ilora.general import generate_general_rows, normalize_answer, rows_to_dataset, score_general, wilson_interval


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate_general_rows(150, seed=4, split="test", families=["count", "color", "compare"], image_size=32)


@pytest.mark.parametrize(
    "raw, normal",
    [(" Red. ", "red"), ("TOP-LEFT", "top-left"), ("first..", "first"), ("ms  pacman\n", "ms pacman"), ("3", "3")],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal
    assert normalize_answer("top left") != normalize_answer("top-left")


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # narrower with more data around the same proportion
    assert wilson_interval(500, 1000)[1] - wilson_interval(500, 1000)[0] < high - low


def test_perfect_predictor_scores_one(rows):
    calls = []

    def oracle(batch):
        calls.append(len(batch))
        return [row["answer"].upper() + "." for row in batch]  # normalisation must absorb this

    report = score_general(oracle, rows, batch_size=16)
    assert sum(calls) == len(rows) and max(calls) == 16
    assert report["overall"]["accuracy"] == 1.0 and report["overall"]["n"] == 150
    assert set(report["per_task"]) == {"count", "color", "compare"}
    for stats in report["per_task"].values():
        assert stats["accuracy"] == 1.0 and stats["n"] == 50 and stats["ci95_high"] == 1.0
        assert stats["ci95_low"] < 1.0


def test_constant_predictor_scores_the_prior(rows):
    report = score_general(lambda batch: ["no"] * len(batch), rows)
    share = sum(r["answer"] == "no" for r in rows) / len(rows)
    assert report["overall"]["accuracy"] == pytest.approx(share)
    compare = [r for r in rows if r["task"] == "compare"]
    assert report["per_task"]["compare"]["correct"] == sum(r["answer"] == "no" for r in compare)
    assert report["per_task"]["count"]["accuracy"] == 0.0
    stats = report["overall"]
    assert stats["ci95_low"] <= stats["accuracy"] <= stats["ci95_high"]
    # the majority rate is what the best constant answer per family would score
    for task, task_stats in report["per_task"].items():
        answers = Counter(r["answer"] for r in rows if r["task"] == task)
        assert task_stats["majority_rate"] == pytest.approx(answers.most_common(1)[0][1] / sum(answers.values()))


def test_scores_a_dataset_like_a_list(rows):
    predict = lambda batch: [row["prompt"][-2] for row in batch]  # noqa: E731 - arbitrary but deterministic
    assert score_general(predict, rows_to_dataset(rows[:30])) == score_general(predict, rows[:30])


def test_wrong_number_of_predictions_is_an_error(rows):
    with pytest.raises(IloraError, match="returned 1 answers for a batch of 8"):
        score_general(lambda batch: ["x"], rows, batch_size=8)
    with pytest.raises(IloraError, match="batch_size"):
        score_general(lambda batch: [], rows, batch_size=0)
