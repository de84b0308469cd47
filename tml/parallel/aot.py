"""The pod plan, MaxText-style: compile the training step ahead of time for a TPU pod
topology from a CPU host and report per-device memory and the step's collectives.

    python -m tml.parallel.aot +experiment=tml_interaction_small_tpu --topology v5p:4x4x4
    python -m tml.parallel.aot model=small parallel.mesh.fsdp=2 parallel.mesh.expert=2 \\
        parallel.mesh.data=1 --topology v5e:2x2 train.batch_size=4 loader.row_length=256

Devices: with ``libtpu`` importable (``pip install 'tml[tpu-aot]'``, the libtpu 0.0.42.*
that jax 0.10.2's own ``jax[tpu]`` extra pins), ``jax.experimental.topologies`` describes
the named TPU topology on this CPU host and XLA's TPU compiler compiles for it; no TPU is
touched. Without libtpu, ``--fake-cpu`` compiles for as many fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX starts) with the
same mesh shape: the shardings and collectives are GSPMD's for that mesh, the memory
figures XLA:CPU's (a stand-in, and said so in the table).

What is compiled is the trainer's step (:func:`tml.train.step.make_train_step`, with the
recipe's sharding rules: on this fsdp x expert mesh its GSPMD layout — each micro-batch
split over the batch axes, weight gradients shard by shard,
:func:`tml.kernels.sharded_weight_grads`), its two programs as
:meth:`~tml.train.step.TrainStep.jit` runs them, with the batch-invariant kernels traced
for the target (:func:`tml.kernels.compile_target`) and two changes: the gradient leaves
the gradients program **sharded like the parameters**, where the trainer asks for it
replicated (``out_shardings=(replicated,) * 3``), which on a pod would put a full copy of
the gradient on every chip; and the MoE layers run expert-parallel
(:func:`tml.parallel.expert_parallel`, ``--capacity-factor``; ``--no-expert-parallel``
leaves them to GSPMD), which ``tml train`` does not enter yet. ``--loss-chunk N``
computes the text loss N positions at a time (:func:`tml.model.loss.chunked_text_logprobs`).

The model's ``scan_layers`` / ``remat`` (``model.scan_layers=true model.remat=true``, on
in ``+experiment=tml_interaction_small_tpu``) decide what a 48-layer step costs to compile
and to hold: scanned, the 47 MoE layers are one loop body compiled once; rematerialised,
the backward pass keeps one hidden state per layer instead of every block's activations.

``impl`` (``--impl``, default ``reference``): the batch-invariant kernels' jnp algorithm,
lowered by XLA for TPU. ``--impl pallas`` fails on any mesh with more than one device:
"Mosaic kernels cannot be automatically partitioned. Please wrap the call in a
shard_map." The fsdp x expert step runs under GSPMD (:mod:`tml.train.step`), and a Pallas
call has no partitioning rule; it needs a ``shard_map`` (or ``custom_partitioning``)
around each kernel before the Pallas path can run on a pod.

Figures per device (the most loaded one): parameters and optimizer state from their
shardings; arguments / outputs / temporaries (activations) of each program from
``compiled.memory_analysis()``; collective bytes = the summed operand sizes of every
all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute in the
compiled HLO as one run of the program executes them (an op inside a while loop counts
its loop's ``known_trip_count`` times, or the count inferred from its condition where the
TPU compiler prints none, :func:`collective_bytes`); compile time per phase (trace,
lower, compile). A program the TPU compiler finds too large for the chip's HBM is
reported as "does not fit" with the temporaries it asked for. JSON: ``bench_results/aot.json``,
one entry per command (:func:`record_plan`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from pathlib import Path

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
DEFAULT_OUT = "bench_results/aot.json"


# ---------------------------------------------------------------------------
# HLO collectives
# ---------------------------------------------------------------------------

_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _type_bytes(type_text: str) -> int:
    """Bytes of an HLO type (``bf16[4,8]{1,0}`` or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines} of an HLO module's text, and the entry's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _COMPUTATION.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
            if line.startswith("}"):
                current = None
                continue
        if current is not None and line.strip():
            comps[current].append(line)
    return comps, entry


def _executions(comps: dict[str, list[str]], entry: str | None) -> tuple[dict[str, int], int]:
    """How many times each computation runs per execution of the entry: a while body (and
    condition) runs its loop's ``known_trip_count`` times per run of the caller, every
    other called computation (fusions, calls, async wrappers, both branches of a
    conditional: an upper bound) once. Returns ({name: runs}, number of while loops
    whose trip count the compiler did not know, counted once per run)."""
    runs: dict[str, int] = {}
    unknown = 0
    if entry is None:  # a fragment: every computation once
        return {name: 1 for name in comps}, 0

    def visit(name: str, times: int, depth: int = 0) -> None:
        nonlocal unknown
        if name not in comps or depth > 64:
            return
        runs[name] = runs.get(name, 0) + times
        for line in comps[name]:
            called = _CALLED.findall(line)
            for b in _BRANCHES.findall(line):
                called += [c.strip().lstrip("%") for c in b.split(",") if c.strip()]
            if not called:
                continue
            n = 1
            if " while(" in line:
                m = _TRIP_COUNT.search(line)
                inferred = None if m else _inferred_trip_count(comps, name, line)
                if m:
                    n = int(m.group(1))
                elif inferred is not None:
                    n = inferred
                else:
                    unknown += times
            for c in called:
                visit(c, times * n, depth + 1)

    visit(entry, 1)
    return runs, unknown


_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_WHILE_INIT = re.compile(r"\bwhile\(%?([\w.\-]+)\)")
_CONST = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\][^=]*\bconstant\((-?\d+)\)")
_GTE = re.compile(r"^\s*%?([\w.\-]+)\s*=.*get-tuple-element\(%?[\w.\-]+\),\s*index=(\d+)")
_LT = re.compile(r"compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),\s*direction=LT")
_COPY = re.compile(r"^\s*%?([\w.\-]+)\s*=.*?\bcopy\(%?([\w.\-]+)\)")
_TUPLE = re.compile(r"^\s*%?([\w.\-]+)\s*=.*?\btuple\((.*?)\)(?:,|$)")


def _inferred_trip_count(comps: dict[str, list[str]], caller: str, line: str) -> int | None:
    """Trip count of a while loop the compiler printed without ``known_trip_count`` (the
    TPU compiler's HLO): its condition ``compare(get-tuple-element(p, index=k),
    constant(N)), direction=LT`` gives the bound N, the loop's init tuple element k (a
    constant in ``caller``, else 0) the start — the counted loop that ``lax.scan`` /
    ``fori_loop`` lower to. ``None`` when the condition is not of that form."""
    cm, im = _CONDITION.search(line), _WHILE_INIT.search(line)
    if not cm or cm.group(1) not in comps:
        return None
    consts, gtes, bound, index = {}, {}, None, None
    for cl in comps[cm.group(1)]:
        if m := _CONST.match(cl):
            consts[m.group(1)] = int(m.group(2))
        if m := _GTE.match(cl):
            gtes[m.group(1)] = int(m.group(2))
        if m := _LT.search(cl):
            a, b = m.groups()
            if a in gtes and b in consts:
                index, bound = gtes[a], consts[b]
    if bound is None:
        return None
    start = 0
    if im:
        defs = {m.group(1): m.group(2) for cl in comps[caller] if (m := _TUPLE.match(cl))}
        caller_consts = {m.group(1): int(m.group(2)) for cl in comps[caller] if (m := _CONST.match(cl))}
        copies = {m.group(1): m.group(2) for cl in comps[caller] if (m := _COPY.match(cl))}
        operands = [o.split("*/")[-1].strip().lstrip("%") for o in defs.get(im.group(1), "").split(",")]
        if index < len(operands):
            op = operands[index]
            for _ in range(4):  # the init may be a copy of the constant
                op = copies.get(op, op)
            start = caller_consts.get(op, 0)
    return max(bound - start, 0)


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes", "step_count", "step_bytes"}} over the collectives of a
    compiled HLO module (per device: an SPMD-partitioned module's shapes are shards).

    ``count`` / ``bytes``: each collective instruction once, as written in the program;
    ``step_count`` / ``step_bytes``: as executed by one run of the program, an
    instruction inside a while loop counted its loop's ``known_trip_count`` times (nested
    loops multiply; both branches of a conditional count, an upper bound; a loop without
    a known trip count counts once, and ``unknown_trip_counts`` under the key ``"loops"``
    says how many such loops ran). Operand sizes come from the defining instruction of
    each operand (post-optimisation HLO prints operands by name). Async pairs count once
    (``-start``; ``-done`` skipped).
    """
    comps, entry = _computations(hlo_text)
    if not comps:  # bare instruction lines (no computation headers)
        comps, entry = {"": hlo_text.splitlines()}, None
    runs, unknown = _executions(comps, entry)
    shapes: dict[str, int] = {}
    found: list[tuple[str, str, int]] = []
    for name, lines in comps.items():
        for line in lines:
            m = _DEF.match(line)
            if not m:
                continue
            inst, type_text, op, rest = m.groups()
            shapes[inst] = _type_bytes(type_text)
            kind = op.removesuffix("-start")
            if kind in COLLECTIVES:
                found.append((kind, rest, runs.get(name, 0)))
    out: dict[str, dict[str, int]] = {k: {"count": 0, "bytes": 0, "step_count": 0, "step_bytes": 0}
                                      for k in COLLECTIVES}
    for kind, rest, times in found:
        args = rest.split(")", 1)[0]
        names = re.findall(r"%([\w.\-]+)", args)
        size = sum(shapes.get(n, 0) for n in names) or _type_bytes(args)
        out[kind]["count"] += 1
        out[kind]["bytes"] += size
        out[kind]["step_count"] += times
        out[kind]["step_bytes"] += times * size
    out["loops"] = {"unknown_trip_counts": unknown}
    return out


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------


def batch_shapes(batch_size: int, row_length: int, max_patches: int) -> dict:
    """Abstract packed rows (:class:`tml.stream.PackedRows` fields) of one global batch."""
    import jax
    import numpy as np

    from tml.stream import STREAM_FIELDS
    from tml.stream.layout import PATCH_SHAPE
    from tml.stream.micro_turns import N_MELS

    B, L = batch_size, row_length
    spec = {"tokens": ((B, L), np.int32), "modality": ((B, L), np.int8), "positions": ((B, L), np.int32),
            "segment_ids": ((B, L), np.int32), "micro_turn": ((B, L), np.int32),
            "loss_kind": ((B, L), np.int8), "dmel": ((B, L, N_MELS), np.uint8),
            "patch_index": ((B, L), np.int32), "patches": ((B, max_patches, *PATCH_SHAPE), np.uint8)}
    if set(spec) != set(STREAM_FIELDS):
        raise RuntimeError(f"tml.parallel.aot.batch_shapes is out of date with STREAM_FIELDS {STREAM_FIELDS}")
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()}


def _shard_bytes(abstract, shardings) -> float:
    """Bytes of the most loaded device for a tree of abstract arrays and their shardings."""
    import jax
    import numpy as np

    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    return float(total)


def optimizer_shardings(opt_state, params, p_sh, replicated):
    """Shardings of an optax state: a leaf under the same path as a parameter (Adam's
    ``mu`` / ``nu``: ``...nu['blocks'][0]['attn']['wq'].value``) with its shape gets that
    parameter's sharding, everything else (step counts) is replicated — as GSPMD lays
    out ``tx.init`` of sharded parameters (an AOT-compiled program reports its outputs
    on the host instead, so they are spelt out)."""
    import jax

    key = jax.tree_util.keystr
    by_path = {key(path): (leaf.shape, sh) for (path, leaf), sh in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(p_sh))}

    def one(path, leaf):
        k = key(path)
        for pk, (shape, sh) in by_path.items():
            if k.endswith(pk) and tuple(leaf.shape) == tuple(shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
            "code": int(m.generated_code_size_in_bytes), "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}


def compile_plan(cfg, devices, *, platform: str, impl: str = "reference", expert_parallel: bool = True,
                 capacity_factor: float | None = None, loss_chunk: int = 0) -> dict:
    """Compile the training step of ``cfg`` (a :class:`tml.config.TmlConfig`) for ``devices``
    (TPU topology devices, or CPU devices) → the plan as a JSON-able dict.

    ``expert_parallel``: trace the step inside :func:`tml.parallel.expert_parallel` (MoE
    dispatch by all-to-all over ``expert``, ``capacity_factor`` ``None`` = dropless) when
    the model has MoE layers and the mesh an ``expert`` axis > 1; otherwise GSPMD
    partitions the one-device MoE layer, whose tile scan over the sorted tokens it cannot
    split (every chip would run the whole micro-batch's experts). ``loss_chunk``: the text
    loss's vocabulary projection in chunks of that many positions (0 = whole logits)."""
    import contextlib

    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from tml import kernels
    from tml.model.loss import LossWeights
    from tml.model.model import InteractionModel
    from tml.parallel import make_mesh
    from tml.parallel.sharding import batch_sharding, bytes_per_device, state_shardings
    from tml.train.optim import make_optimizer
    from tml.train.step import make_train_step

    mesh = make_mesh(cfg.parallel.mesh, devices=list(devices))
    rules = cfg.parallel.rules
    tc = cfg.train
    model = nnx.eval_shape(lambda: InteractionModel(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p_sh, r_sh = state_shardings(params, rules, mesh), state_shardings(rest, rules, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    tx = make_optimizer(cfg.optim.resolved(tc.steps))
    batch = batch_shapes(tc.batch_size, cfg.loader.row_length, cfg.loader.max_patches_per_row)
    b_sh = {k: batch_sharding(mesh, rules, tc.batch_size) for k in batch}
    step = make_train_step(graphdef, tx, LossWeights(tc.loss_text, tc.loss_speech, tc.loss_control),
                           cfg.model.balance_rate, micro_batches=tc.micro_batches, mesh=mesh, rules=rules,
                           loss_chunk=loss_chunk)
    from tml.parallel.expert import expert_parallel as ep_block

    programs: dict[str, dict] = {}
    moe = "moe" in cfg.model.resolved_mlp_types() and dict(mesh.shape).get("expert", 1) > 1
    ep = ep_block(mesh, rules=rules, capacity_factor=capacity_factor) if moe and expert_parallel else \
        contextlib.nullcontext()
    with kernels.kernel_mode(tc.kernel_mode), kernels.kernel_impl(impl), kernels.compile_target(platform), ep:
        opt_state = jax.eval_shape(tx.init, params)
        o_sh = optimizer_shardings(opt_state, params, p_sh, rep)
        grads_j = jax.jit(step.gradients, in_shardings=(p_sh, r_sh, b_sh), out_shardings=(p_sh, rep, rep))
        programs["gradients"] = _program(grads_j, params, rest, batch)
        grads, _, load = jax.eval_shape(step.gradients, params, rest, batch)
        update_j = jax.jit(step.update, in_shardings=(p_sh, r_sh, o_sh, p_sh, rep),
                           out_shardings=(p_sh, r_sh, o_sh, rep), donate_argnums=(0, 1, 2))
        programs["update"] = _program(update_j, params, rest, opt_state, grads, load)
    total_params, per_params = bytes_per_device(params, rules, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return {
        "model": cfg.model.name, "platform": platform,
        "devices": len(mesh.devices.flat), "device_kind": str(getattr(mesh.devices.flat[0], "device_kind", "")),
        "mesh": {a: int(n) for a, n in dict(mesh.shape).items()},
        "batch": {"rows": tc.batch_size, "row_length": cfg.loader.row_length,
                  "micro_batches": tc.micro_batches, "kernel_mode": tc.kernel_mode, "impl": impl},
        "expert_parallel": ({"capacity_factor": capacity_factor} if moe and expert_parallel else None),
        "loss_chunk": loss_chunk,
        "layers": cfg.model.n_layers, "scan_layers": cfg.model.scan_layers, "remat": cfg.model.remat,
        "parameters": {"count": int(n_params), "bytes_total": int(total_params), "bytes_per_device": per_params},
        "optimizer": {"bytes_per_device": _shard_bytes(opt_state, o_sh)},
        "fits": all("error" not in p for p in programs.values()),
        "programs": programs,
    }


_OUT_OF_MEMORY = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _program(jitted, *args) -> dict:
    """One program compiled → {"memory", "collectives", "seconds"}; a program that does not
    fit the device's memory (the TPU compiler's RESOURCE_EXHAUSTED) → {"error", "seconds",
    "temporaries_required"} (bytes, parsed from the message) instead of an exception."""
    seconds: dict[str, float] = {}
    try:
        compiled = _timed_compile(jitted, args, seconds)
    except Exception as e:  # jax.errors.JaxRuntimeError; anything but out-of-memory is re-raised
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg:
            raise
        m = _OUT_OF_MEMORY.search(msg)
        need = float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_") if m else None
        return {"error": msg.strip().splitlines()[0][:400], "seconds": seconds,
                "temporaries_required": need, "compiler_message": msg[:20000]}
    return {"memory": _memory(compiled), "collectives": collective_bytes(compiled.as_text()), "seconds": seconds}


def _timed_compile(jitted, args, seconds: dict):
    """``jitted.trace(*args).lower().compile()``, the seconds of each phase written into
    ``seconds`` ("trace", "lower", "compile") and printed to stderr as it ends (a
    full-size compile runs for many minutes)."""
    import time

    name = getattr(jitted, "__name__", "program")

    def timed(phase, fn):
        t = time.perf_counter()
        try:
            return fn()
        finally:
            seconds[phase] = round(time.perf_counter() - t, 2)
            print(f"  {name}: {phase} {seconds[phase]:.1f} s", file=sys.stderr, flush=True)

    traced = timed("trace", lambda: jitted.trace(*args))
    lowered = timed("lower", traced.lower)
    return timed("compile", lowered.compile)


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3f} GiB" if n >= 2**24 else f"{n / 2**20:,.2f} MiB"


def table_rows(plan: dict) -> list[tuple[str, str, str]]:
    """(what, gradients program, update program) rows of the per-device table."""
    g, u = plan["programs"]["gradients"], plan["programs"]["update"]
    rows = [("parameters / device", _gib(plan["parameters"]["bytes_per_device"]), ""),
            ("optimizer state / device", _gib(plan["optimizer"]["bytes_per_device"]), "")]
    if not plan.get("fits", True):
        def oom(p):
            need = p.get("temporaries_required")
            return "fits" if "error" not in p else ("does not fit: " + (f"temporaries {_gib(need)}" if need else
                                                                         p["error"]))
        rows.append(("device memory", oom(g), oom(u)))
        rows.append(("compile time (trace + lower + compile)", _seconds(g["seconds"]), _seconds(u["seconds"])))
        return rows
    for key in ("arguments", "outputs", "temporaries"):
        label = "temporaries (activations)" if key == "temporaries" else key
        rows.append((label, _gib(g["memory"][key]), _gib(u["memory"][key])))
    peak = lambda p: _gib(p["memory"]["peak"]) if p["memory"].get("peak") else "not reported"  # noqa: E731
    rows.append(("peak device memory (compiler)", peak(g), peak(u)))
    for kind in COLLECTIVES:
        a, b = g["collectives"][kind], u["collectives"][kind]
        rows.append((f"{kind} bytes / step (ops run)", f"{_gib(a['step_bytes'])} ({a['step_count']:,})",
                     f"{_gib(b['step_bytes'])} ({b['step_count']:,})"))
    rows.append(("compile time (trace + lower + compile)", _seconds(g["seconds"]), _seconds(u["seconds"])))
    return rows


def _seconds(s: dict) -> str:
    parts = " + ".join(f"{s[k]:,.0f}" for k in ("trace", "lower", "compile") if k in s)
    return f"{sum(s.values()):,.0f} s ({parts})"


def format_table(plan: dict) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in plan["mesh"].items() if n > 1) or "1 device"
    n = plan["parameters"]["count"]
    count = f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"
    topo = f" (topology {plan['topology']})" if plan.get("topology") and not plan.get("stand_in") else ""
    head = (f"{plan['model']}: {count} parameters on {plan['devices']} "
            f"{plan['device_kind'] or plan['platform']} devices{topo}, mesh {mesh}; batch {plan['batch']['rows']} x "
            f"{plan['batch']['row_length']}, {plan['batch']['micro_batches']} micro-batch(es), "
            f"{plan['batch']['kernel_mode']} kernels (impl={plan['batch']['impl']})")
    if plan.get("expert_parallel") is not None:
        cf = plan["expert_parallel"]["capacity_factor"]
        head += f"; MoE expert-parallel ({'dropless' if cf is None else f'capacity factor {cf:g}'})"
    if plan.get("loss_chunk"):
        head += f"; text loss in chunks of {plan['loss_chunk']} positions"
    how = [w for w, on in (("layers scanned", plan.get("scan_layers")), ("blocks rematerialised", plan.get("remat")))
           if on]
    head += f"; {plan['layers']} layers" + (f" ({', '.join(how)})" if how else "")
    if plan.get("stand_in"):
        head += f"\n(stand-in: {plan['stand_in']})"
    lines = [head, "", "| per device | gradients program | update program |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table_rows(plan)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# devices and the command
# ---------------------------------------------------------------------------


def have_libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str):
    """Compile-only devices of a named TPU topology (e.g. ``v5e:2x2``, ``v5p:4x4x4``) via libtpu."""
    # only a description is made (no chip is opened): several such processes may run at once,
    # which libtpu's per-host lock file (/tmp/libtpu_lockfile) would otherwise refuse
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def load_config(overrides: list[str]):
    """The composed recipe (``recipes/config.yaml`` + Hydra overrides) as a TmlConfig."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from tml.config import register_configs

    register_configs()
    with initialize_config_module("tml.recipes", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def run(overrides: list[str], *, topology: str | None, fake_cpu: int = 0, out: str | None = DEFAULT_OUT,
        impl: str = "reference", expert_parallel: bool = True, capacity_factor: float | None = None,
        loss_chunk: int = 0) -> dict:
    """Compile and report (this process must not have started JAX if ``fake_cpu``)."""
    cfg = load_config(overrides)
    kw = {"impl": impl, "expert_parallel": expert_parallel, "capacity_factor": capacity_factor,
          "loss_chunk": loss_chunk}
    if fake_cpu:
        import jax

        if jax.device_count() < fake_cpu:
            raise RuntimeError(f"--fake-cpu {fake_cpu}: JAX started with {jax.device_count()} devices; run "
                               f"this in a fresh process (python -m tml.parallel.aot ... --fake-cpu {fake_cpu})")
        plan = compile_plan(cfg, jax.devices()[:fake_cpu], platform="cpu", **kw)
        plan["stand_in"] = (f"{fake_cpu} fake CPU devices with the mesh of {topology or 'the topology'}: "
                            "GSPMD's shardings and collectives, XLA:CPU's memory figures")
    else:
        if not have_libtpu():
            raise RuntimeError("libtpu is not installed: pip install 'tml[tpu-aot]' (libtpu 0.0.42.*), or pass "
                               "--fake-cpu N for a stand-in with N fake CPU devices")
        plan = compile_plan(cfg, tpu_devices(topology), platform="tpu", **kw)
    plan["topology"] = topology
    plan["overrides"] = list(overrides)
    plan["flags"] = ([] if expert_parallel else ["--no-expert-parallel"]) + \
        ([f"--capacity-factor {capacity_factor:g}"] if capacity_factor is not None else []) + \
        ([f"--loss-chunk {loss_chunk}"] if loss_chunk else [])
    if out:
        record_plan(out, plan)
    return plan


def plan_key(plan: dict) -> str:
    """The command that made a plan: its overrides and the topology (or the stand-in)."""
    where = f"--fake-cpu {plan['devices']}" if plan.get("stand_in") else f"--topology {plan['topology']}"
    return " ".join([*plan["overrides"], where, *plan.get("flags", [])])


def record_plan(out: str, plan: dict) -> None:
    """Add ``plan`` to the JSON file ``out`` ({"plans": {command: plan}}), replacing the plan of
    the same command, so that one file keeps the runs of several configurations."""
    import json

    from tml.files import atomic_write_json

    path = Path(out)
    doc = {"plans": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            doc["plans"] = dict(old.get("plans", {})) if isinstance(old, dict) else {}
        except json.JSONDecodeError:
            pass  # an unreadable file is replaced
    doc["plans"][plan_key(plan)] = plan
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tml.parallel.aot", description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:4x4x4", help="TPU topology name for libtpu (default v5p:4x4x4)")
    ap.add_argument("--fake-cpu", type=int, default=0, help="stand-in: compile for N fake CPU devices")
    ap.add_argument("--impl", default="reference", choices=("reference", "pallas"),
                    help="batch_invariant implementation (pallas needs shard_map-wrapped kernels, see the docstring)")
    ap.add_argument("--capacity-factor", type=float, default=None,
                    help="expert-parallel buffer capacity factor (default: dropless worst-case buffers)")
    ap.add_argument("--loss-chunk", type=int, default=0,
                    help="text loss: vocabulary projection this many positions at a time (default 0: whole)")
    ap.add_argument("--no-expert-parallel", action="store_true",
                    help="leave the MoE layers to GSPMD instead of tml.parallel.expert_parallel")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT}; '' = none)")
    args, overrides = ap.parse_known_args(argv)
    if args.fake_cpu and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                   f"--xla_force_host_platform_device_count={args.fake_cpu}".strip(), JAX_PLATFORMS="cpu")
        sys.exit(subprocess.call([sys.executable, "-m", "tml.parallel.aot", *(argv or sys.argv[1:])], env=env))
    if not args.fake_cpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu only describes the topology here
    plan = run(overrides, topology=args.topology, fake_cpu=args.fake_cpu, out=args.out or None, impl=args.impl,
               expert_parallel=not args.no_expert_parallel, capacity_factor=args.capacity_factor,
               loss_chunk=args.loss_chunk)
    print(format_table(plan))
    if args.out:
        print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
