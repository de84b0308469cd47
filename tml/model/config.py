"""Model configuration (``recipes/model/*.yaml`` are validated against ``ModelConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tml.text import ByteTokenizer


# ModelConfig fields that say how full rows are computed, not what is computed: the
# parameters and the bits do not depend on them, so checkpoints do not either
# (tml.train.checkpoint leaves them out of a checkpoint's model-config fingerprint).
COMPUTE_LAYOUT_FIELDS = ("scan_layers", "remat")


@dataclass
class ModelConfig:
    """Sizes of the co-trained interaction model.

    Per-layer choices: ``layer_types[i]`` is ``"full"`` or ``"sliding"`` attention,
    ``mlp_types[i]`` is ``"dense"`` (SwiGLU) or ``"moe"``. Empty lists mean: every
    ``sliding_every``-th layer is full attention and the others sliding (all full when
    ``sliding_window == 0``); the first ``n_dense_layers`` layers dense and the rest MoE
    (all dense when ``n_experts == 0``).

    How full rows are computed (the parameters and the bits do not change, see
    :meth:`tml.model.model.InteractionModel.__call__`): ``scan_layers`` runs each stretch of
    consecutive layers of the same MLP type as one ``lax.scan`` over their stacked
    parameters, so a 48-layer model compiles like a 2-layer one (MaxText's
    ``scan_layers``); ``remat`` recomputes each layer's activations in the backward pass
    (``jax.checkpoint`` per block), so a step keeps one hidden state per layer.
    """

    name: str = "tiny"
    vocab_size: int = ByteTokenizer().vocab_size
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    sliding_window: int = 0
    sliding_every: int = 4
    layer_types: list[str] = field(default_factory=list)
    d_ff: int = 384
    # mixture of experts
    n_experts: int = 0
    n_shared_experts: int = 0
    top_k: int = 2
    d_expert: int = 128
    route_scale: float = 1.0
    n_dense_layers: int = 0
    mlp_types: list[str] = field(default_factory=list)
    balance_rate: float = 1e-3           # score-correction bias step per update
    # front ends (Inkling conventions)
    n_mels: int = 80
    n_bins: int = 16
    patch_size: int = 40
    temporal_patch_size: int = 2
    n_channels: int = 3
    vision_layers: int = 3
    # misc
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "auto"                  # compute dtype: auto | float32 | bfloat16
    param_dtype: str = "float32"
    # how full rows are computed (not what): see the class docstring
    scan_layers: bool = False
    remat: bool = False

    def compute_dtype(self):
        """The activation dtype: ``dtype``, where ``"auto"`` is bfloat16 on GPU/TPU (matmul
        units with float32 accumulation) and float32 on CPU (no bfloat16 arithmetic)."""
        import jax
        import jax.numpy as jnp

        if self.dtype == "auto":
            return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
                             else jnp.float32)
        return jnp.dtype(self.dtype)

    def resolved_layer_types(self) -> list[str]:
        if self.layer_types:
            return list(self.layer_types)
        if self.sliding_window <= 0:
            return ["full"] * self.n_layers
        return ["full" if (i + 1) % self.sliding_every == 0 else "sliding" for i in range(self.n_layers)]

    def resolved_mlp_types(self) -> list[str]:
        if self.mlp_types:
            return list(self.mlp_types)
        if self.n_experts <= 0:
            return ["dense"] * self.n_layers
        return ["dense" if i < self.n_dense_layers else "moe" for i in range(self.n_layers)]

    def validate(self) -> "ModelConfig":
        problems = []
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        lt, mt = self.resolved_layer_types(), self.resolved_mlp_types()
        if len(lt) != self.n_layers or set(lt) - {"full", "sliding"}:
            problems.append(f"layer_types must be {self.n_layers} of 'full'/'sliding', got {lt}")
        if len(mt) != self.n_layers or set(mt) - {"dense", "moe"}:
            problems.append(f"mlp_types must be {self.n_layers} of 'dense'/'moe', got {mt}")
        if "moe" in mt and not (0 < self.top_k <= self.n_experts):
            problems.append(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if "sliding" in lt and self.sliding_window <= 0:
            problems.append("sliding layers need sliding_window > 0")
        if self.vocab_size < ByteTokenizer().vocab_size:
            problems.append(f"vocab_size={self.vocab_size} is smaller than the tokenizer's")
        if problems:
            raise ValueError(f"model config {self.name!r}: " + "; ".join(problems))
        return self
