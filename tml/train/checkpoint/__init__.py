"""Training checkpoints: Orbax ``CheckpointManager`` with keep-last / keep-best policies,
resharding restore and a model-config guard; the SIGTERM (preemption) handler is
:mod:`tml.train.preemption` (re-exported here).

One checkpoint is the directory ``<dir>/<step>/`` holding five Orbax items:

=============  ===========================================================================
``model``      the model's state (``nnx.State`` or any pytree of arrays), see *layout*
               in :mod:`.storable`
``opt_state``  the optimizer state (optax state pytree, or ``nnx.State`` of an
               ``nnx.Optimizer``); optional
``rng``        PRNG key(s), any pytree; typed keys (``jax.random.key``) are stored as
               their ``key_data`` and re-wrapped on restore; optional
``data``       the data loader state of *every* process (``LoaderState.to_dict()``),
               JSON; on restore each process gets back its own (:mod:`.gather`)
``meta``       JSON: step, config fingerprint and the flattened model config, key
               implementations, metrics, format version
=============  ===========================================================================

One concern per module:

====================  ====================================================================
:mod:`.manager`       :class:`Checkpointer` (save / restore / queries), :class:`Restored`;
                      atomic saves, async
:mod:`.storable`      array trees ↔ stored nested dicts (layout, typed keys), restore targets
                      on any mesh, :func:`with_shardings`
:mod:`.fingerprint`   model-config fingerprint and the config guard (pure Python)
:mod:`.retention`     keep-last / keep-best as Orbax preservation policies
:mod:`.gather`        every process's loader state, gathered as JSON
:mod:`.errors`        the error classes and their messages
====================  ====================================================================
"""

from tml.train.checkpoint.errors import (
    CheckpointConfigMismatchError,
    CheckpointError,
    CheckpointSaveError,
    CheckpointStructureError,
    NoCheckpointError,
)
from tml.train.checkpoint.fingerprint import (
    config_diff,
    config_fingerprint,
    config_to_dict,
    flatten_config,
)
from tml.train.checkpoint.manager import ARRAY_ITEMS, FORMAT_VERSION, Checkpointer, Restored
from tml.train.checkpoint.storable import to_storable, with_shardings
from tml.train.config import CheckpointConfig
from tml.train.preemption import PreemptionHandler, install_preemption_handler

__all__ = [
    "Checkpointer", "CheckpointConfig", "Restored", "CheckpointError", "NoCheckpointError",
    "CheckpointSaveError", "CheckpointConfigMismatchError", "CheckpointStructureError",
    "config_fingerprint", "config_diff", "flatten_config", "config_to_dict", "to_storable",
    "with_shardings", "install_preemption_handler", "PreemptionHandler",
    "FORMAT_VERSION", "ARRAY_ITEMS",
]
