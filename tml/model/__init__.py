"""The co-trained interaction model (Flax NNX).

``tml.model.config`` is light (no JAX) so that configs load without starting JAX; the
rest is imported on first use: ``from tml.model import InteractionModel``.
"""

from tml.model.config import ModelConfig

_LAZY = {
    "InteractionModel": "tml.model.model",
    "KVCache": "tml.model.kv_cache",
    "AttentionMask": "tml.model.layers",
    "Outputs": "tml.model.model",
    "losses": "tml.model.loss",
    "LossWeights": "tml.model.loss",
    "token_logprobs": "tml.model.loss",
    "count_params": "tml.model.count",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["ModelConfig", *_LAZY]
