"""The GRPO family by name (`grpo.loss_type`): each variant's paper defaults for the knobs
under it, and the `grpo` config section's resolution into one concrete `LossSettings`.

| loss_type | loss_agg | scale_rewards | clip (low / high) | ratio_level | form  | dynamic_sampling | overlong |
|-----------|----------|---------------|-------------------|-------------|-------|------------------|----------|
| grpo      | sequence | group         | 0.2 / 0.2         | token       | clip  | off              | none     |
| dr_grpo   | constant | none          | 0.2 / 0.2         | token       | clip  | off              | none     |
| dapo      | token    | group         | 0.2 / 0.28        | token       | clip  | on               | penalty  |
| gspo      | sequence | group         | 3e-4 / 4e-4       | sequence    | clip  | off              | none     |
| cispo     | token    | group         | none / 4.0 (w <= 5) | token     | cispo | off              | none     |

grpo: DeepSeekMath (Shao et al. 2024), jaxgpt's defaults before the variants existed.
dr_grpo: "Understanding R1-Zero-Like Training" (Liu et al. 2025): no std division, the
token sum over a constant (completions x the completion budget, as TRL's `dr_grpo`).
dapo: Yu et al. 2025: clip-higher 0.28, token-level loss, dynamic sampling (zero-signal
groups dropped and refilled), soft overlong punishment (a buffer of 20% of the budget, as
4,096 of 20,480 tokens, penalty factor 1).
gspo: Zheng et al. 2025 (Qwen3): one importance ratio per sequence (the geometric mean of
the token ratios), clipped to [1 - 3e-4, 1 + 4e-4].
cispo: MiniMax-M1 (2025): the importance weight itself is truncated and its gradient stopped,
no lower bound, w <= 5 (TRL's `epsilon_high=5.0` for cispo, which caps w directly; here
`clip_eps_high` is the distance above 1, so 4.0), token-level loss.
Every variant: no KL term (`kl_beta` 0, as TRL's default beta and the RFS finding).

A knob left `null` in the config takes the variant's value; one that is set wins, so e.g.
`--set grpo.loss_type=dapo --set grpo.dynamic_sampling=false` is DAPO without refills.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxgpt.config import one_of
from jaxgpt.errors import UserError
from jaxgpt.rl.grpo import LOSS_AGGREGATIONS, RATIO_LEVELS, REWARD_SCALES

OVERLONG = ("none", "mask", "penalty")

VARIANTS: dict[str, dict] = {
    "grpo": dict(loss_agg="sequence", scale_rewards="group", clip_eps=0.2, clip_eps_high=0.2, ratio_level="token",
                 form="clip", dynamic_sampling=False, overlong="none"),
    "dr_grpo": dict(loss_agg="constant", scale_rewards="none", clip_eps=0.2, clip_eps_high=0.2, ratio_level="token",
                    form="clip", dynamic_sampling=False, overlong="none"),
    "dapo": dict(loss_agg="token", scale_rewards="group", clip_eps=0.2, clip_eps_high=0.28, ratio_level="token",
                 form="clip", dynamic_sampling=True, overlong="penalty"),
    "gspo": dict(loss_agg="sequence", scale_rewards="group", clip_eps=3e-4, clip_eps_high=4e-4, ratio_level="sequence",
                 form="clip", dynamic_sampling=False, overlong="none"),
    "cispo": dict(loss_agg="token", scale_rewards="group", clip_eps=1.0, clip_eps_high=4.0, ratio_level="token",
                  form="cispo", dynamic_sampling=False, overlong="none"),
}
LOSS_TYPES = tuple(VARIANTS)
KNOBS = ("loss_agg", "scale_rewards", "clip_eps", "clip_eps_high", "ratio_level", "dynamic_sampling", "overlong")


@dataclass(frozen=True)
class LossSettings:
    """The resolved `grpo` section: every knob concrete."""

    loss_type: str
    loss_agg: str
    scale_rewards: str
    clip_eps: float
    clip_eps_high: float
    ratio_level: str
    form: str
    kl_beta: float
    dynamic_sampling: bool
    max_sampling_tries: int
    overlong: str
    overlong_buffer: int  # tokens
    overlong_penalty: float
    log_kl: bool

    @property
    def needs_reference(self) -> bool:
        """Whether the frozen reference is loaded and scored at all."""
        return self.kl_beta > 0 or self.log_kl


def resolve(g, max_new_tokens: int) -> LossSettings:
    """`LossSettings` from a `grpo` section (`jaxgpt.tasks.grpo.GRPOSection`): the variant's
    defaults, overridden by every knob that is set. UserError for an unknown loss type, an
    unknown choice, a clip range with eps_high < eps_low, a negative KL coefficient, ...
    (a static check: it runs before anything is written)."""
    one_of(g.loss_type, LOSS_TYPES, "grpo.loss_type")
    v = dict(VARIANTS[g.loss_type])
    for knob in KNOBS:
        value = getattr(g, knob)
        if value is not None:
            v[knob] = value
    if g.normalize_std is not None:  # the earlier spelling of scale_rewards
        legacy = "group" if g.normalize_std else "none"
        if g.scale_rewards is not None and g.scale_rewards != legacy:
            raise UserError(f"grpo.normalize_std={g.normalize_std} (the earlier spelling of grpo.scale_rewards) "
                            f"contradicts grpo.scale_rewards={g.scale_rewards}; set only scale_rewards")
        v["scale_rewards"] = legacy
    if g.clip_eps_high == 0.0:  # the earlier spelling: 0 = the same as clip_eps
        v["clip_eps_high"] = v["clip_eps"]
    one_of(v["loss_agg"], LOSS_AGGREGATIONS, "grpo.loss_agg")
    one_of(v["scale_rewards"], REWARD_SCALES, "grpo.scale_rewards")
    one_of(v["ratio_level"], RATIO_LEVELS, "grpo.ratio_level")
    one_of(v["overlong"], OVERLONG, "grpo.overlong")
    if not v["clip_eps"] > 0:
        raise UserError(f"grpo.clip_eps must be > 0, got {v['clip_eps']}")
    if v["clip_eps_high"] < v["clip_eps"]:
        raise UserError(f"grpo.clip_eps_high ({v['clip_eps_high']}) must be >= grpo.clip_eps ({v['clip_eps']}): "
                        "the upper clip range is epsilon_high, the lower epsilon_low (0 = the same as clip_eps)")
    kl_beta = g.kl_beta
    if not kl_beta >= 0:
        raise UserError(f"grpo.kl_beta must be >= 0, got {kl_beta}")
    if g.max_sampling_tries < 1:
        raise UserError(f"grpo.max_sampling_tries must be >= 1, got {g.max_sampling_tries}")
    if g.overlong_buffer < 0:
        raise UserError(f"grpo.overlong_buffer must be >= 0 (0 = 20% of rollout.max_new_tokens), "
                        f"got {g.overlong_buffer}")
    if not g.overlong_penalty >= 0:
        raise UserError(f"grpo.overlong_penalty must be >= 0, got {g.overlong_penalty}")
    buffer = g.overlong_buffer or max(1, round(0.2 * max_new_tokens))
    if v["overlong"] == "penalty" and buffer > max_new_tokens:
        raise UserError(f"grpo.overlong_buffer={buffer} exceeds rollout.max_new_tokens={max_new_tokens}")
    return LossSettings(loss_type=g.loss_type, loss_agg=v["loss_agg"], scale_rewards=v["scale_rewards"],
                        clip_eps=float(v["clip_eps"]), clip_eps_high=float(v["clip_eps_high"]),
                        ratio_level=v["ratio_level"], form=v["form"], kl_beta=float(kl_beta),
                        dynamic_sampling=bool(v["dynamic_sampling"]), max_sampling_tries=g.max_sampling_tries,
                        overlong=v["overlong"], overlong_buffer=buffer, overlong_penalty=float(g.overlong_penalty),
                        log_kl=bool(g.log_kl))


__all__ = ["KNOBS", "LOSS_TYPES", "LossSettings", "OVERLONG", "VARIANTS", "resolve"]
