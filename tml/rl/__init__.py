"""tml.rl: on-policy RL (GRPO / PPO) over the bitwise-aligned streaming engine.

The engine plays groups of scripted scenario episodes (:mod:`~tml.rl.episodes`,
:mod:`~tml.rl.rollout`), the eval scorers are the rewards (:mod:`~tml.rl.rewards`), the
trainer rescores the same tokens with :func:`tml.sampler.score` and updates the policy
(:mod:`~tml.rl.learner`, :mod:`~tml.rl.objectives`), the new weights are pushed into the
running engine, and the drift metrics are logged every step (:mod:`~tml.rl.loop`,
``tml rl``). Import the submodules; this package imports nothing heavy.
"""
