"""The cached, resumable stage runner behind `ilora experiment`."""

from __future__ import annotations

import shutil

import pytest

from ilora.experiment.stages import StageRunner


def pipeline(run_dir, force=(), config=None):
    """a -> b -> c, and d independent; each stage writes a file and counts its runs."""
    config = config or {"x": 1}
    runner = StageRunner(run_dir, force=tuple(force), log=lambda *_: None)
    runner.run("a", config, lambda f: (f / "out").write_text("a"))
    runner.run("b", {}, lambda f: (f / "out").write_text("b"), deps=["a"])
    runner.run("c/one", {}, lambda f: (f / "out").write_text("c"), deps=["b"])
    runner.run("d", {}, lambda f: (f / "out").write_text("d"))
    return runner


def test_rerun_skips_every_stage(tmp_path):
    first = pipeline(tmp_path)
    assert first.ran == ["a", "b", "c/one", "d"]
    again = pipeline(tmp_path)
    assert again.ran == [] and again.skipped == ["a", "b", "c/one", "d"]


def test_deleting_a_stage_redoes_it_and_what_depends_on_it(tmp_path):
    pipeline(tmp_path)
    shutil.rmtree(tmp_path / "b")
    assert pipeline(tmp_path).ran == ["b", "c/one"]


def test_config_change_and_force_redo_dependents_only(tmp_path):
    pipeline(tmp_path)
    assert pipeline(tmp_path, config={"x": 2}).ran == ["a", "b", "c/one"]
    assert pipeline(tmp_path, config={"x": 2}, force=["c"]).ran == ["c/one"]


def test_failed_stage_leaves_nothing_behind(tmp_path):
    runner = StageRunner(tmp_path, log=lambda *_: None)

    def boom(folder):
        (folder / "partial").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        runner.run("e", {}, boom)
    assert list(tmp_path.iterdir()) == []
    assert runner.run("e", {}, lambda f: 7) == tmp_path / "e"
    assert runner.result("e") == 7


def test_config_hash_counts_dataclasses_by_their_fields():
    import dataclasses

    from ilora.experiment.stages import config_hash

    @dataclasses.dataclass
    class Settings:
        episodes: int = 3
        hidden: int = dataclasses.field(default=1, repr=False)

    assert config_hash({"eval": Settings()}) == config_hash({"eval": {"episodes": 3, "hidden": 1}})
    assert config_hash({"eval": Settings(hidden=2)}) != config_hash({"eval": Settings()})
