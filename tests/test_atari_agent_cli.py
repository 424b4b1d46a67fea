"""`ilora play` end to end on the tiny model, adapters, and gameplay videos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ilora.atari.agent import VLMAgent, load_agent
from ilora.atari.evaluate import play_episodes
from ilora.atari.experts import get_expert
from ilora.atari.video import PANEL_WIDTH, SCALE, EpisodeRecorder, save_video
from ilora.cli import main


def test_play_command_writes_summary_json_and_gif(tiny_vlm_dir, tmp_path, capsys):
    gif, out = tmp_path / "play.gif", tmp_path / "play.json"
    args = ["play", "--model", str(tiny_vlm_dir), "--game", "Pong", "--episodes", "2", "--envs", "2",
            "--max-frames", "80", "--mode", "generate", "--max-new-tokens", "3", "--video", str(gif), "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "human-normalised" in printed and "paper's zero rule" in printed and "mode=generate" in printed
    payload = json.loads(out.read_text())
    assert [r["episode"] for r in payload["records"]] == [0, 1]
    assert payload["settings"]["fire_on_reset"] is False and payload["settings"]["model"] == str(tiny_vlm_dir)
    assert all(r["capped"] and r["length"] == 20 for r in payload["records"])
    # An untrained model's 3-token answers never name an action: reported, every step counted.
    assert payload["summary"]["invalid_rate"] == 1.0 and payload["summary"]["never_parsed"]
    assert "no answer named a valid action" in printed

    import imageio.v3 as iio

    frames = iio.imread(gif, index=None)
    assert frames.shape[:3] == (20, 210 * SCALE, 160 * SCALE + PANEL_WIDTH)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--game", "Pongg"], "known games: Alien"),
        (["--game", "Pong", "--video", "x.avi"], "video must end in .gif or .mp4"),
        (["--game", "Pong", "--adapter", "no/such/adapter"], "not a PEFT adapter folder"),
        (["--game", "Pong", "--episodes", "0"], "n_episodes must be >= 1"),
    ],
)
def test_play_bad_input_is_one_line_and_exit_2(tiny_vlm_dir, capsys, extra, message):
    assert main(["play", "--model", str(tiny_vlm_dir), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("ilora play: error: ") and message in errors[0]


def test_adapter_is_merged_without_changing_the_scores(tiny_vlm, tiny_vlm_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from ilora.models.load import load_vlm

    base, processor = load_vlm(tiny_vlm_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")

    merged = load_agent(str(tiny_vlm_dir), "Pong", adapter=str(tmp_path / "adapter"))
    assert merged.settings["adapter"] == str(tmp_path / "adapter")
    unmerged_model = PeftModel.from_pretrained(load_vlm(tiny_vlm_dir)[0], tmp_path / "adapter").eval()
    unmerged = VLMAgent(unmerged_model, processor, "Pong")
    plain = VLMAgent(tiny_vlm[0], processor, "Pong")
    observations = _two_observations()
    with torch.inference_mode():
        got = merged.score_actions(merged._encode(merged.rows(observations)))
        want = unmerged.score_actions(unmerged._encode(unmerged.rows(observations)))
        untouched = plain.score_actions(plain._encode(plain.rows(observations)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - untouched).abs().max() > 1e-3  # the adapter really changes the model


def _two_observations():
    from ilora.atari.envs import TwoFrameEnv

    env = TwoFrameEnv("Pong")
    first = env.reset(seed=0)
    second = env.step("RIGHT").observation
    env.close()
    return [first, second]


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_video_of_an_expert_episode(tmp_path, suffix):
    if suffix == ".mp4":
        pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    recorder = EpisodeRecorder(episode=1, max_steps=12)
    play_episodes(get_expert("Pong"), "Pong", 2, n_envs=2, max_frames=200, on_step=recorder, progress=False)
    assert [s.step for s in recorder.steps] == list(range(12))
    assert all(s.valid and "Action:" not in s.answer for s in recorder.steps)  # expert reasoning, no prefix
    path = save_video(recorder.steps, tmp_path / f"pong{suffix}", "Pong")
    assert path.exists() and not list(tmp_path.glob(".*partial*"))
    frames = iio.imread(path, index=None)
    assert len(frames) == 12
    if suffix == ".gif":  # lossless: the game frame is the left part, scaled by nearest neighbour
        np.testing.assert_array_equal(frames[3][::SCALE, : 160 * SCALE : SCALE, :3], recorder.steps[3].frame)
