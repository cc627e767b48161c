"""Reinforcement-learning fine-tuning: verifiable tasks, rollouts, the GRPO family and PPO.

    tasks.py            verifiable tasks (`arithmetic`, `gsm8k`), the strict verifier, `sft_splits`
    math_answers.py     the math verifier: final answers found, normalised, compared (sympy, time-limited)
    rollout.py          G sampled completions per prompt in one jitted call, and their log-probs
    grpo.py             advantages, the GRPO-family losses and their aggregation (pure functions)
    grpo_variants.py    grpo, dr_grpo, dapo, gspo, cispo by name: each paper's defaults, knob resolution
    dynamic_sampling.py DAPO's zero-signal group filter and refills
    grpo_experience.py  one GRPO iteration's rollouts, rewards, refills, overlong shaping, advantages
    evaluation.py       greedy accuracy, unbiased pass@k, format rate, completion length
    ppo.py              value head, GAE, KL-shaped rewards and the clipped PPO losses (pure functions)
    common.py           the RL recipe base (`RLTask`): experience -> inner epochs of the shared train step
    prompt_sets.py      task and instruction prompts, encoded and left-padded once

The `finetune.py grpo` / `ppo` commands live in `jaxgpt.tasks.grpo` / `jaxgpt.tasks.ppo`;
`python -m jaxgpt evaluate` in `jaxgpt.cli.evaluate`.
"""
