"""The training step: canonical micro-batches, a fixed gradient-sum tree, AdamW.

The global batch ``[B, ...]`` is cut into ``n = train.micro_batches`` **canonical
micro-batches** of ``B / n`` rows (micro-batch ``m`` = rows ``[m·B/n, (m+1)·B/n)``), the
same cut on every mesh. Each micro-batch's gradient is computed alone, with the same
shapes whatever the number of devices, and the ``n`` gradients are summed in one fixed
tree, the adjacent-pairs :func:`tml.kernels.sequence_tree`:

* data-parallel rank ``k`` of ``d`` holds micro-batches ``[k·n/d, (k+1)·n/d)`` (the batch is
  split over the ``data`` mesh axis in row order) and sums them with a scan that keeps
  one partial sum per tree level (a binary counter: ``log2(n/d) + 1`` gradient-sized
  buffers, not ``n/d``);
* the ``d`` rank sums are then combined by :func:`tml.kernels.ordered_all_reduce`
  (all-gather, the same tree).

When ``n/d`` is a power of two the two levels compose into the one tree over ``n``, so
with the ``batch_invariant`` kernels the summed gradient, and therefore the update (when
compiled as its own program, :meth:`TrainStep.jit`), has the same bits for data-parallel
degrees 1, 2, 4, ... and across processes (``tests/train/test_parallel.py``).
In ``standard`` mode the same code sums micro-batches left to right and reduces over
ranks with ``psum``, and the bits depend on ``d``.

Parallelism comes from outside the model. On a pure data-parallel mesh the gradient is a
``shard_map`` over ``data``. A mesh that also uses ``fsdp``/``tensor``/``expert`` runs the
whole step under GSPMD: micro-batches are then slices of the global batch spread over
the devices, and the compiler inserts the reductions, close to but not bitwise equal to
the one-device result (:mod:`tml.parallel.sharding`). (A shard_map manual over ``data``
with the other axes automatic crashes XLA:CPU's partitioner in JAX 0.10.)

Under GSPMD the step pins the layout MaxText-style (:class:`_BatchLayout`): every
micro-batch ``[B/n, ...]`` is split over the ``"batch"`` rule's mesh axes (data x fsdp x
expert by default, those dividing ``B/n``) — the stacked micro-batches ``[n, B/n, ...]``
are resharded once so that each one is spread over all devices instead of sitting on
the few that hold its rows of the global batch — and so are the model's outputs; the
gradient of each micro-batch is pinned to the parameters' shardings; and every
batch-invariant weight gradient ``x.T @ dy`` is computed shard by shard over those axes
(:func:`tml.kernels.sharded_weight_grads`), where its one chain over all rows made the
compiler gather ``dy`` — for the text head the float32 logits gradient of the whole
micro-batch, 3.3 GB per row of 4,096 positions x 201,024 entries — onto every chip.

The loss is the mean over micro-batches of each micro-batch's per-kind token means.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from tml import kernels
from tml.model.loss import LossWeights, losses
from tml.model.moe import update_balance_bias
from tml.train.state import StepOutput, TrainState

DATA_AXIS = "data"


def split_micro(batch: dict, n: int) -> dict:
    """[B, ...] → [n, B/n, ...] (micro-batch m = rows [m·B/n, (m+1)·B/n))."""
    for k, v in batch.items():
        if v.shape[0] % n:
            raise ValueError(f"batch of {v.shape[0]} rows ({k}) does not split into {n} micro-batches")
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def tree_accumulate(fn: Callable, xs, *, mode: str | None = None):
    """Sum ``fn(x)[0]`` over the leading axis (length n) of ``xs`` with a ``lax.scan``.

    fn: x → (tree to sum, aux). Returns (sum, stacked aux [n, ...]). batch_invariant: the
    adjacent-pairs tree of :func:`tml.kernels.sequence_tree` (bitwise equal to it),
    kept as one partial sum per tree level; standard: left to right.
    """
    shape = jax.eval_shape(lambda x: fn(x)[0], jax.tree.map(lambda v: v[0], xs))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    if kernels.resolve_mode(mode) == "standard":
        def seq(acc, x):
            g, aux = fn(x)
            return jax.tree.map(jnp.add, acc, g), aux

        return jax.lax.scan(seq, zeros, xs)

    n = jax.tree.leaves(xs)[0].shape[0]
    if n == 1:
        # the scan below with one element stores ``rounded(g)`` in level 0 and returns
        # it: the same bits without the loop, its zero-filled gradient-sized carry and the
        # selects over every parameter (~10% of a one-micro-batch step on CPU)
        g, aux = fn(jax.tree.map(lambda v: v[0], xs))
        return jax.tree.map(kernels.rounded, g), jax.tree.map(lambda a: a[None], aux)
    levels = max(n.bit_length(), 1)

    def body(carry, x):
        i, stack = carry
        g, aux = fn(x)
        # rounded first: fused with its producer, the tree's add could become an FMA,
        # which a data-parallel rank's all-gathered add never is
        g = jax.tree.map(kernels.rounded, g)
        active = jnp.bool_(True)
        new = []
        for j in range(levels):     # binary counter: level j holds a complete 2^j subtree
            occupied = ((i >> j) & 1) == 1
            combine, store = active & occupied, active & ~occupied
            left = stack[j]
            new.append(jax.tree.map(lambda a, b, s=store: jnp.where(s, b, a), left, g))
            g = jax.tree.map(lambda a, b, c=combine: jnp.where(c, a + b, b), left, g)
            active = combine
        return (i + 1, tuple(new)), aux

    (_, stack), aux = jax.lax.scan(body, (jnp.int32(0), (zeros,) * levels), xs)
    total = None                    # the partial subtrees of n, smallest first
    for j in range(levels):
        if (n >> j) & 1:
            total = stack[j] if total is None else jax.tree.map(jnp.add, stack[j], total)
    return total, aux


class _BatchLayout:
    """The GSPMD step's sharding constraints (see the module docstring): ``rules`` (the
    :mod:`tml.parallel.sharding` rule set, ``None`` = defaults) decide the batch axes
    (the ``"batch"`` rule) and the parameters' shardings (their logical axes)."""

    def __init__(self, mesh, rules):
        from tml.parallel.sharding import normalize_rules

        self.mesh, self.rules = mesh, normalize_rules(rules, mesh)

    def spec(self, rows: int) -> P:
        """PartitionSpec of a [rows, ...] array: rows over the batch axes dividing it."""
        from tml.parallel.sharding import batch_spec

        return batch_spec(self.mesh, self.rules, rows)

    def axes(self, rows: int) -> tuple[str, ...]:
        entry = tuple(self.spec(rows))
        entry = entry[0] if entry else None
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    def _pin(self, x, spec: P):
        from jax.sharding import NamedSharding

        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def micro_batches(self, micro: dict) -> dict:
        """[n, B/n, ...] → the same, each micro-batch split over the batch axes."""
        return {k: self._pin(v, P(None, *self.spec(v.shape[1]))) for k, v in micro.items()}

    def rows(self, tree):
        """Every [rows, ...] leaf of ``tree`` split over the batch axes."""
        return jax.tree.map(lambda v: self._pin(v, self.spec(v.shape[0])) if v.ndim else v, tree)

    def like_params(self, grads, params):
        """``grads`` pinned to the shardings of ``params`` (same tree, from the logical axes)."""
        from tml.parallel.sharding import state_shardings

        sh = jax.tree.leaves(state_shardings(params, self.rules, self.mesh, strict=False))
        leaves, tree = jax.tree.flatten(grads)
        return jax.tree.unflatten(tree, [jax.lax.with_sharding_constraint(g, s) for g, s in zip(leaves, sh)])


def make_train_step(graphdef, tx, weights: LossWeights, balance_rate: float, *,
                    micro_batches: int = 1, mesh=None, rules=None, loss_chunk: int = 0):
    """The training step, a :class:`TrainStep`: ``(TrainState, batch [B, ...]) → StepOutput``
    (the new state, the metrics, the expert load).

    ``mesh``: a :func:`tml.parallel.make_mesh` mesh (``None`` = one device); the batch is
    split over its ``data`` axis, which must divide ``micro_batches``. ``rules``: the
    sharding rules (``None`` = :data:`tml.parallel.DEFAULT_RULES`) whose ``"batch"`` entry
    and parameter names lay out a GSPMD step (a mesh with ``fsdp`` / ``tensor`` /
    ``expert`` > 1; unused on one device and on a pure data-parallel mesh). ``loss_chunk``
    > 0: the text loss's vocabulary projection ``loss_chunk`` positions at a time
    (:func:`tml.model.loss.chunked_text_logprobs`; 0 = the model's whole logits). Metrics:
    per-kind losses and token counts (means / sums over micro-batches) and ``grad_norm``;
    the MoE expert load [n_moe_layers, E] (mean over micro-batches) comes beside them.
    """
    sizes = {} if mesh is None else {a: int(n) for a, n in dict(mesh.shape).items()}
    # Ordered data parallelism needs the data axis manual (shard_map); with other axes
    # also > 1, XLA:CPU's partitioner fails on the partly-manual program (JAX 0.10), so
    # such meshes leave the whole step to GSPMD (compiler-ordered reductions).
    ordered = sizes.get(DATA_AXIS, 1) > 1 and all(n == 1 for a, n in sizes.items() if a != DATA_AXIS)
    d = sizes[DATA_AXIS] if ordered else 1
    layout = _BatchLayout(mesh, rules) if any(n > 1 for n in sizes.values()) and not ordered else None
    if micro_batches % d:
        raise ValueError(f"train.micro_batches={micro_batches} must be a multiple of the data-parallel "
                         f"degree {d} (each rank computes whole canonical micro-batches): set e.g. "
                         f"train.micro_batches={d}, and keep it fixed to keep the bits across meshes")

    def loss_fn(params, rest, mb):
        model = nnx.merge(graphdef, params, rest)
        out = model(mb)
        if layout is not None:
            out = out._replace(**layout.rows({k: getattr(out, k) for k in ("text_logits", "speech_logits",
                                                                             "hidden")}))
        head = model.text_head.w[...] if loss_chunk else None
        loss, metrics = losses(out, mb, weights, text_head_w=head, chunk=loss_chunk)
        return loss, (metrics, out.expert_load)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def rank_grads(params, rest, batch):
        """This rank's rows [B/d, ...] → the summed gradient over all ranks, gathered aux."""
        def one(mb):
            if layout is None:
                (_, aux), grads = grad_fn(params, rest, mb)
                return grads, aux
            mb = layout.rows(mb)
            rows = jax.tree.leaves(mb)[0].shape[0]
            with kernels.sharded_weight_grads(layout.mesh, layout.axes(rows)):
                (_, aux), grads = grad_fn(params, rest, mb)
            return layout.like_params(grads, params), aux

        micro = split_micro(batch, micro_batches // d)
        if layout is not None:
            micro = layout.micro_batches(micro)
        grads, aux = tree_accumulate(one, micro)
        if ordered:
            grads = jax.tree.map(lambda g: kernels.ordered_all_reduce(g, DATA_AXIS), grads)
            aux = jax.tree.map(lambda a: jax.lax.all_gather(a, DATA_AXIS, axis=0, tiled=True), aux)
        return grads, aux

    if ordered:
        # check_vma=False: the kernels' lax.cond / scan carries are not annotated with
        # varying-axis types; the outputs are replicated by construction (all-gathers).
        rank_grads = jax.shard_map(rank_grads, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)),
                                   out_specs=(P(), P()), axis_names={DATA_AXIS}, check_vma=False)

    def gradients(params, rest, batch):
        """→ (summed gradient / micro_batches, metrics, expert load [n_moe_layers, E]), replicated."""
        grads, (metrics, loads) = rank_grads(params, rest, batch)
        grads = jax.tree.map(lambda g: g / micro_batches, grads)
        metrics = jax.tree.map(lambda m: m.mean(0) if m.dtype.kind == "f" else m.sum(0), metrics)
        return grads, metrics, loads.mean(0)

    def update(params, rest, opt_state, grads, load):
        """AdamW on the gradient, then the MoE balance bias → (params, rest, opt_state, grad_norm)."""
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        model = nnx.merge(graphdef, params, rest)
        if load.shape[0]:
            update_balance_bias(model, load, balance_rate)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return params, rest, opt_state, optax.global_norm(grads)

    return TrainStep(gradients, update)


class TrainStep:
    """``step(state: TrainState, batch) → StepOutput(state, metrics, expert_load)``.

    Two pure stages on arrays, :attr:`gradients` ``(params, rest, batch) → (grads, metrics,
    expert_load)`` (forward/backward over the micro-batches and the data-parallel sum) and
    :attr:`update` ``(params, rest, opt_state, grads, expert_load) → (params, rest,
    opt_state, grad_norm)`` (AdamW, the MoE balance bias). Calling the object runs both in
    one program, e.g. under ``jax.jit``. :meth:`jit` compiles them as **two** programs
    instead, which is what the trainer runs: XLA fuses the optimizer's elementwise
    arithmetic into whatever produced the gradient, and LLVM contracts multiply-adds into
    FMAs (one rounding, not two) differently in differently fused programs, so an update
    fused into a data-parallel program did not round like the one-device update of the
    same gradient. Compiled alone, the update's program is the same for every
    data-parallel degree (replicated state), and so are its bits.
    """

    def __init__(self, gradients, update):
        self.gradients, self.update = gradients, update

    @staticmethod
    def _step(gradients, update, state: TrainState, batch) -> StepOutput:
        grads, metrics, load = gradients(state.params, state.rest, batch)
        params, rest, opt_state, norm = update(state.params, state.rest, state.opt_state, grads, load)
        new = state.replace(params=params, rest=rest, opt_state=opt_state, step=state.step + 1)
        return StepOutput(new, metrics | {"grad_norm": norm}, load)

    def __call__(self, state: TrainState, batch) -> StepOutput:
        return self._step(self.gradients, self.update, state, batch)

    def jit(self, *, state_shardings=None, metrics_sharding=None):
        """The two stages jitted (the update donates the old params, rest and optimizer
        state); same signature. ``state_shardings``: (params, rest, opt_state) shardings."""
        grads_fn = jax.jit(self.gradients, out_shardings=None if metrics_sharding is None
                           else (metrics_sharding,) * 3)
        out = None if state_shardings is None else (*state_shardings, metrics_sharding)
        update_fn = jax.jit(self.update, donate_argnums=(0, 1, 2), out_shardings=out)
        return lambda state, batch: self._step(grads_fn, update_fn, state, batch)


def make_eval_step(graphdef, weights: LossWeights):
    """``(params, rest, batch) → metrics`` (per-kind losses on held-out rows)."""
    def ev(params, rest, batch):
        return losses(nnx.merge(graphdef, params, rest)(batch), batch, weights)[1]

    return ev
