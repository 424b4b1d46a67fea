"""What ``ilora rl`` reads: :class:`GRPOSettings` (a plain dataclass: importing it loads no ML library).

The names of the GRPO knobs follow TRL's ``GRPOConfig`` where one exists (``num_generations``
is ``group_size``, ``num_iterations`` is ``epochs``, ``epsilon``/``epsilon_high`` are
``clip_low``/``clip_high``, ``beta`` is ``beta``); the class does not subclass it. TRL 1.16
installs beside transformers 5.24 without changing it, but ``GRPOConfig`` is a
``TrainingArguments`` for a trainer that generates text completions and scores them with
reward functions: its hundred-odd generation, vLLM and logging fields would be settings that
do nothing here, and its checks (generation batch sizes divisible by ``num_generations``)
are about batches this loop does not have. The agent's action is not a sampled completion but
a draw from the softmax over the action names' scores, and a reward comes from the emulator,
so the loop and the loss are written here (``ilora.rl.grpo``).
"""

from __future__ import annotations

import dataclasses

from ilora.atari.games import (
    DEFAULT_MAX_EPISODE_FRAMES,
    DEFAULT_REPEAT_ACTION_PROBABILITY,
)
from ilora.config import field
from ilora.errors import IloraError

LORA_PARTS = ("vision", "projector", "language")


@dataclasses.dataclass
class GRPOSettings:
    """One ``ilora rl`` run's settings (YAML keys of ``--config``, ``--set key=value``)."""

    frames: int = field(200_000, help="budget: emulator frames played by all rollouts; training stops after the "
                        "update that reaches it (an update plays at most groups x group_size x horizon agent steps "
                        "of frame_skip frames, plus automatic FIRE presses)")
    groups: int = field(4, help="start states per update: one running episode each, played by the current policy")
    group_size: int = field(8, help="continuations from each start state (TRL's num_generations)")
    horizon: int = field(16, help="agent steps of a continuation: its first action sampled, then the current policy")
    stop_on_life_loss: bool = field(True, help="a continuation also ends at a lost life (or, in Pong, a lost point)")
    temperature: float = field(1.0, help="the policy is softmax(action-name scores / temperature), sampled")
    learning_rate: float = field(1e-3, help="AdamW learning rate of the LoRA parameters")
    epochs: int = field(1, help="gradient steps on each update's groups (TRL's num_iterations); clipping acts "
                        "from the second on")
    clip_low: float = field(0.2, help="the ratio is clipped below at 1 - clip_low (TRL's epsilon)")
    clip_high: float = field(0.2, help="the ratio is clipped above at 1 + clip_high (TRL's epsilon_high)")
    beta: float = field(0.04, help="weight of KL(policy || reference) on the start states; the reference is the "
                        "weights the run starts from (the base, or the --init-adapter)")
    max_grad_norm: float = field(1.0, help="gradient norm clip per step (0: none)")
    lora_r: int = field(16, help="LoRA rank of a new adapter (an --init-adapter keeps its own)")
    lora_alpha: float = field(32.0, help="LoRA alpha of a new adapter")
    lora_parts: list[str] = field(default_factory=lambda: list(LORA_PARTS), help="VLM parts a new adapter goes on")
    eps_kl: float = field(0.01, help="with --general: weight of KL(p_base || p_lora) on general rows' answer tokens "
                          "(routing tuning's term)")
    eps_norm: float = field(0.01, help="with --general: weight of the LoRA-B output norm on general rows")
    general_rows: int = field(8, help="with --general: general rows per gradient step")
    object_text: bool = field(True, help="the RAM object-state text in the prompt (as the default experiment's "
                              "adapters are trained and played)")
    fire_on_reset: bool = field(True, help="press FIRE after a reset and each lost life, as play's --fire-on-reset")
    repeat_action_probability: float = field(DEFAULT_REPEAT_ACTION_PROBABILITY, help="sticky actions (ALE v5)")
    max_episode_frames: int = field(DEFAULT_MAX_EPISODE_FRAMES, help="episode cap of the running episodes")
    save_every: int = field(20, help="updates between checkpoints in <out>.run (0: none)")
    seed: int = field(0, help="seed of the LoRA initialisation, the episodes and the action sampling")
    dtype: str = field("float32", help="model dtype: float32, bfloat16, float16")
    device: str = field("cpu", help="torch device")

    def __post_init__(self) -> None:
        for name in ("frames", "groups", "horizon", "epochs", "lora_r", "general_rows", "max_episode_frames"):
            if getattr(self, name) < 1:
                raise IloraError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.group_size < 2:
            raise IloraError(f"group_size = {self.group_size}: a group needs >= 2 continuations to compare")
        for name in ("temperature", "learning_rate", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise IloraError(f"{name} = {getattr(self, name)}: must be > 0")
        if not 0 < self.clip_low < 1:
            raise IloraError(f"clip_low = {self.clip_low}: must be in (0, 1)")
        for name in ("clip_high", "beta", "max_grad_norm", "eps_kl", "eps_norm", "save_every"):
            if getattr(self, name) < 0:
                raise IloraError(f"{name} = {getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.repeat_action_probability <= 1.0:
            raise IloraError(f"repeat_action_probability = {self.repeat_action_probability}: must be in [0, 1]")
        unknown = sorted(set(self.lora_parts) - set(LORA_PARTS))
        if unknown or not self.lora_parts:
            raise IloraError(f"lora_parts = {self.lora_parts}: expected some of {list(LORA_PARTS)}")
