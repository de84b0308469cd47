"""``tml rl``'s structured config (JAX-free: ``import tml.config`` starts no JAX).

Every default here is the default recipe's value (``recipes/rl/default.yaml`` holds
nothing else); ``tml rl rl.kernel_mode=standard`` runs the same recipe on the
non-invariant kernels, to see the drift."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineMeshConfig:
    """Where the engine runs (:mod:`tml.rl.distributed`): ``tensor`` > 1 serves it
    tensor-parallel on devices of its own, not the learner's."""

    tensor: int = 1                      # engine TP degree; 1 = the learner's device (one process)
    algorithm: str = "one_shot"          # row-parallel reduction: one_shot | two_shot (same bits)


@dataclass
class RLConfig:
    init_checkpoint: str = "runs/tiny"   # what `make run` writes (run dir, checkpoints/ or step dir); none = fresh
    run_dir: str = "runs/rl"             # metrics.jsonl, checkpoints/
    steps: int = 4                       # learner updates
    seed: int = 0                        # episode seeds, fresh weights, scenario generator
    kernel_mode: str = "batch_invariant"  # or standard (the drift baseline)
    scenarios: list[str] = field(default_factory=lambda: ["turn_taking", "mid_pause"])  # one group each per step
    group_size: int = 4                  # G episodes per scenario (same inputs, different sampling seeds)
    max_micro_turns: int = 45            # episode cut; tasks whose window ends later are dropped; 0 = whole
    max_context: int = 2048              # KV slots per episode (an episode needing more is dropped)
    temperature: float = 1.0             # rollout sampling (> 0: a group needs different episodes)
    top_p: float = 1.0
    max_output_tokens: int = 12          # per-micro-turn output budget, <end> included
    rewards: dict[str, float] = field(default_factory=lambda: {"turn_taking_tor": 1.0, "pause_tor": 1.0})
    episode_seconds: float = 0.0         # > 0: minutes-long episodes, conversations back to back (tml.rl.user)
    user_reacts: bool = True             # long episodes: the user stops when talked over, repeats ignored questions
    user_stop_after: int = 2             # micro-turns of the model speaking over the user before they stop (0 = never)
    user_repeat_after_s: float = 2.0     # an ignored question is asked again after this silence (0 = never)
    user_max_repeats: int = 1            # per question
    credit: str = "episode"              # episode (one advantage per episode) | micro_turn (the scorers' events)
    credit_radius: int = 3               # micro_turn: micro-turns either side of a scorer's credited micro-turn
    advantage: str = "grpo"              # grpo | drgrpo
    std_normalize: bool = True           # grpo only
    aggregation: str = "token_mean"      # token_mean | seq_mean_token_mean | seq_sum_const (drgrpo's)
    speech_weight: float = 1.0           # policy-gradient weight of a speech frame (its 80 channels' log-prob sum)
    #                                      against a text/control token; 0 = learn when to speak, not the audio
    clip_eps: float = 0.2                # PPO-clip: ratio kept in [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0                 # k3 KL to the frozen initial policy; 0 = off (still logged if > 0)
    tis_cap: float = 0.0                 # truncated importance sampling cap; 0 = off
    row_tokens: int = 0                  # learner + score row length, fixed for the run (one compiled shape; an
    #                                      episode laid out longer is dropped); 0 = the step's power-of-two bucket
    learn_rows: int = 0                  # rows per forward/backward (gradients summed over them); 0 = all at once
    ppo_epochs: int = 1                  # gradient steps per rollout batch (full batch each)
    lr: float = 1e-4                     # AdamW (tml.train.optim.make_optimizer), constant, no decay
    clip_norm: float = 1.0
    save_every: int = 0                  # checkpoint every N steps (0: at the end only); SIGTERM saves too
    wandb_mode: str = "disabled"         # offline | online | disabled
    engine_mesh: EngineMeshConfig = field(default_factory=EngineMeshConfig)
    check_push: bool = False             # after every push, log engine/push_bitwise (sha256 of the engine's weights == the learner's)


__all__ = ["EngineMeshConfig", "RLConfig"]
