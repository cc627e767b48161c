"""The run's PRNG streams, all split once from `jax.random.key(train.seed)`."""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Keys:
    """`init` (params), `dropout` (folded with the step inside the train step), `sample`
    (greedy/sampled text; RL splits it into a rollout and a minibatch-shuffle stream)."""

    init: jax.Array
    dropout: jax.Array
    sample: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "Keys":
        init, dropout, sample = jax.random.split(jax.random.key(seed), 3)
        return cls(init=init, dropout=dropout, sample=sample)

    def rollout(self, iteration: int) -> jax.Array:
        """The key of iteration `iteration`'s rollouts."""
        return jax.random.fold_in(jax.random.split(self.sample)[0], iteration)

    def shuffle(self, iteration: int, epoch: int) -> jax.Array:
        """The key that orders inner epoch `epoch`'s minibatches of iteration `iteration`."""
        return jax.random.fold_in(jax.random.fold_in(jax.random.split(self.sample)[1], iteration), epoch)
