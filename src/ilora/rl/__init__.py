"""On-policy RL for LoRA adapters in the real game: GRPO from the agent's own play (``ilora rl``).

``config`` (settings), ``env`` (group rollouts from cloned emulator states), ``grpo`` (the
loss and one update), ``train`` (the run: checkpoints, resume, the saved adapter), ``cli``.
"""
