"""Reinforcement-learning fine-tuning: verifiable tasks, rollouts, GRPO and PPO.

    tasks.py    verifiable tasks (`arithmetic`, `gsm8k`), strict answer extraction, `sft_splits`
    rollout.py  batched sampling of G completions per prompt in one jitted call (on top of
                `jaxgpt.generation.decode.generate_tokens`), and per-token log-probs of completions
    grpo.py     group-normalised advantages and the clipped GRPO loss (pure functions)
    ppo.py      value head, GAE, KL-shaped rewards and the clipped PPO losses (pure functions)
    loop.py     the RL training loop: rollouts -> inner epochs of the shared train step

The `finetune.py grpo` / `ppo` commands live in `jaxgpt.tasks.grpo` / `jaxgpt.tasks.ppo`.
"""
