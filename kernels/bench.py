"""Benchmark every kernel op in ``batch_invariant`` vs ``standard`` mode, side by side.

    python -m tml.kernels.bench                     # tiny + small shapes, writes bench_results/kernels.json
    python -m tml.kernels.bench --out my.json --configs tiny --repeats 5
    python -m tml.kernels.bench --quick             # a smoke run (few shapes, 1 repeat)
    python -m tml.kernels.bench --paged             # paged_attention vs pool / page-table size
    python -m tml.kernels.bench --segments          # training-row attention: skipping segments/padding

Shapes follow ``recipes/model/{tiny,small}.yaml`` (d_model, heads, head_dim, d_ff,
experts) and three regimes (``moe_dense_eq``: one dense matmul with the routed experts'
FLOPs of the ``train`` MoE case, the peak a grouped MoE path could approach;
``moe_ffn_grad`` / ``moe_deq_grad``: the same two, forward + backward):

* ``train``   — full packed training rows (batch x row length);
* ``prefill`` — 8 sessions appending a micro-turn chunk of 24 tokens to their KV cache;
* ``decode``  — 1, 8 or 64 sessions decoding one token against their KV cache.

Both modes of a case are compiled first, then timed alternately (bi, std, bi, std, ...)
so that machine noise hits both; each sample runs the op enough times to last >= 2 ms;
the reported time is the median sample. ``ratio = batch_invariant / standard``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tml.bench_report import environment, write_report

from .moe import moe_ffn, route_topk
from .paged_attention import paged_attention, paged_write
from .reductions import log_softmax, rms_norm
from .split_kv_attention import attention
from .tiled_matmul import matmul

TARGETS = {"train": 1.10, "prefill": 1.25, "decode": 1.25}

CONFIGS = {
    # recipes/model/tiny.yaml / small.yaml; vocab: byte-level text + control tokens
    "tiny": {"d": 128, "hq": 4, "hkv": 2, "hd": 32, "ff": 384, "E": 4, "k": 2, "dE": 128, "vocab": 512,
             "batch": 4, "row": 256, "cache": 512, "window": 0},
    "small": {"d": 512, "hq": 8, "hkv": 4, "hd": 64, "ff": 1536, "E": 8, "k": 2, "dE": 512, "vocab": 512,
              "batch": 2, "row": 1024, "cache": 1024, "window": 256},
}
PREFILL_SESSIONS, PREFILL_CHUNK = 8, 24
DECODE_SESSIONS = (1, 8, 64)


@dataclass
class Case:
    config: str
    op: str
    regime: str
    shape: str
    make: Callable[[str], Callable[[], Any]]  # mode -> zero-arg function returning an array


def _rand(rng, shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _moe_grad(x, experts, weights, wg, wu, wd, *, mode):
    """Gradients of sum(moe_ffn) w.r.t. x, w_gate, w_up, w_down and the routing weights."""
    return jax.grad(lambda x, w, a, b, c: jnp.sum(moe_ffn(x, experts, w, a, b, c, mode=mode)),
                    argnums=(0, 1, 2, 3, 4))(x, weights, wg, wu, wd)


def _matmul_grad(x, w, *, mode):
    """Gradients of sum(x @ w) w.r.t. x and w."""
    return jax.grad(lambda x, w: jnp.sum(matmul(x, w, mode=mode)), argnums=(0, 1))(x, w)


def _cases(name: str, c: dict, quick: bool) -> list[Case]:
    rng = np.random.default_rng(0)
    d, ff, hq, hkv, hd = c["d"], c["ff"], c["hq"], c["hkv"], c["hd"]
    window = c["window"] or None
    regimes = [("train", c["batch"] * c["row"]), ("prefill", PREFILL_SESSIONS * PREFILL_CHUNK)]
    regimes += [("decode", s) for s in ((1, 64) if quick else DECODE_SESSIONS)]
    w_up = _rand(rng, (d, ff), d**-0.5)
    w_down = _rand(rng, (ff, d), ff**-0.5)
    w_norm = _rand(rng, (d,), 0.1) + 1
    wg = _rand(rng, (c["E"], d, c["dE"]), d**-0.5)
    wu = _rand(rng, (c["E"], d, c["dE"]), d**-0.5)
    wd = _rand(rng, (c["E"], c["dE"], d), c["dE"] ** -0.5)
    router = _rand(rng, (d, c["E"]), d**-0.5)
    cases: list[Case] = []

    def add(op, regime, shape, fn, *args, **static):
        jitted = {m: jax.jit(lambda *a, _m=m: fn(*a, mode=_m, **static)) for m in ("batch_invariant", "standard")}
        cases.append(Case(name, op, regime, shape, lambda m: (lambda: jitted[m](*args))))

    for regime, rows in regimes:
        x = _rand(rng, (rows, d))
        h = _rand(rng, (rows, ff))
        add("linear_up", regime, f"[{rows},{d}]@[{d},{ff}]", matmul, x, w_up)
        add("linear_down", regime, f"[{rows},{ff}]@[{ff},{d}]", matmul, h, w_down)
        add("rms_norm", regime, f"[{rows},{d}]", rms_norm, x, w_norm)
        if not quick:
            add("log_softmax", regime, f"[{rows},{c['vocab']}]", log_softmax, _rand(rng, (rows, c["vocab"]), 3.0))
        weights, experts = route_topk(x @ router, c["k"], mode="standard")
        add("moe_ffn", regime, f"T={rows} E={c['E']} k={c['k']} dE={c['dE']}", moe_ffn, x, experts, weights, wg, wu, wd)
        if regime == "train":  # the dense matmul of the experts' FLOPs: [T*k, d] @ [d, 3 dE]
            xa = _rand(rng, (rows * c["k"], d))
            w_eq = _rand(rng, (d, 3 * c["dE"]), d**-0.5)
            add("moe_dense_eq", regime, f"[{rows * c['k']},{d}]@[{d},{3 * c['dE']}]", matmul, xa, w_eq)
            # the training step's cost: forward + backward (gradients of x, the weights, the routing weights)
            add("moe_ffn_grad", regime, f"T={rows} E={c['E']} k={c['k']} dE={c['dE']}", _moe_grad, x, experts,
                weights, wg, wu, wd)
            add("moe_deq_grad", regime, f"[{rows * c['k']},{d}]@[{d},{3 * c['dE']}]", _matmul_grad, xa, w_eq)
    # attention
    B, L = c["batch"], c["row"]
    q = _rand(rng, (B, L, hq, hd))
    k = _rand(rng, (B, L, hkv, hd))
    add("attention", "train", f"B={B} L={L} H={hq}/{hkv} hd={hd}", attention, q, k, k, sliding_window=window)
    C = c["cache"]
    for regime, sessions, tq in [("prefill", PREFILL_SESSIONS, PREFILL_CHUNK)] + [
        ("decode", s, 1) for s in ((1, 64) if quick else DECODE_SESSIONS)
    ]:
        qc = _rand(rng, (sessions, tq, hq, hd))
        kc = _rand(rng, (sessions, C, hkv, hd))
        lens = jnp.asarray(rng.integers(C // 4, C - tq, sessions) + tq, jnp.int32)
        pos = lens[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None]
        add(
            "attention", regime, f"S={sessions} Tq={tq} cache={C}", attention, qc, kc, kc,
            q_positions=pos, kv_lengths=lens, sliding_window=window,
        )
    return cases


def _time_once(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def _measure(case: Case, repeats: int) -> dict:
    fns = {m: case.make(m) for m in ("batch_invariant", "standard")}
    t_compile = {}
    for m, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        t_compile[m] = time.perf_counter() - t0
        jax.block_until_ready(fn())
    one = max(_time_once(fns["standard"], 1), 1e-6)
    inner = max(1, min(200, int(0.002 / one)))
    samples: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for m in ("batch_invariant", "standard"):
            samples[m].append(_time_once(fns[m], inner))
    bi, std = statistics.median(samples["batch_invariant"]), statistics.median(samples["standard"])
    return {
        "config": case.config,
        "op": case.op,
        "regime": case.regime,
        "shape": case.shape,
        "standard_us": std * 1e6,
        "batch_invariant_us": bi * 1e6,
        "ratio": bi / std,
        "samples": repeats,
        "inner_iterations": inner,
        "compile_s": t_compile,
    }


def _table(rows: list[dict]) -> str:
    head = f"{'config':<6} {'op':<12} {'regime':<8} {'shape':<34} {'standard us':>12} {'batch_inv us':>12} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        target = TARGETS["decode" if r["regime"].startswith("decode") else r["regime"]]
        flag = "" if r["ratio"] <= target else "  > target"
        lines.append(
            f"{r['config']:<6} {r['op']:<12} {r['regime']:<8} {r['shape']:<34} "
            f"{r['standard_us']:>12.1f} {r['batch_invariant_us']:>12.1f} {r['ratio']:>6.2f}{flag}"
        )
    return "\n".join(lines)


def _summary(rows: list[dict]) -> dict:
    out = {}
    for regime in ("train", "prefill", "decode"):
        rs = [r["ratio"] for r in rows if r["regime"] == regime]
        if rs:
            out[regime] = {
                "target": TARGETS[regime],
                "median_ratio": statistics.median(rs),
                "max_ratio": max(rs),
                "geomean_ratio": float(np.exp(np.mean(np.log(rs)))),
                "cases_over_target": sum(r > TARGETS[regime] for r in rs),
                "cases": len(rs),
            }
    return out


PAGED_SCALES = (1, 4, 16)


def paged_scaling(repeats: int = 7, scales=PAGED_SCALES, length: int = 512, page_size: int = 128) -> list[dict]:
    """``paged_attention`` for 4 sessions of ``length`` keys (tiny heads) against pools and
    page tables 1x, 4x, 16x larger: compile time (first call) and run time (median)
    of a decode step and a 24-token prefill chunk, next to the gather-then-attend
    ``standard`` path, whose cost grows with the page table."""
    c = CONFIGS["tiny"]
    B, hq, hkv, hd = 4, c["hq"], c["hkv"], c["hd"]
    rng = np.random.default_rng(0)
    rows = []
    base_pages = -(-length // page_size)
    for scale in scales:
        P = base_pages * scale
        n_pages = B * P
        table = jnp.asarray(rng.permutation(n_pages).reshape(B, P), jnp.int32)
        pool = jnp.zeros((n_pages, page_size, hkv, hd), jnp.float32)
        new = _rand(rng, (B, length, hkv, hd))
        kp, vp = jax.jit(paged_write)(pool, pool, table, new, new, jnp.zeros((B,), jnp.int32),
                                      jnp.full((B,), length, jnp.int32))
        lens = jnp.full((B,), length, jnp.int32)
        for regime, tq in (("decode", 1), ("prefill", PREFILL_CHUNK)):
            q = _rand(rng, (B, tq, hq, hd))
            pos = lens[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None]
            row = {"scale": scale, "n_pages": n_pages, "pages_per_session": P, "regime": regime, "tq": tq}
            for mode in ("batch_invariant", "standard"):
                fn = jax.jit(lambda q, kp, vp, _m=mode: paged_attention(
                    q, kp, vp, table, q_positions=pos, kv_lengths=lens, mode=_m))
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, kp, vp))
                row[f"{mode}_compile_s"] = time.perf_counter() - t0
                one = max(_time_once(lambda: fn(q, kp, vp), 1), 1e-6)
                inner = max(1, min(200, int(0.002 / one)))
                row[f"{mode}_us"] = statistics.median(
                    _time_once(lambda: fn(q, kp, vp), inner) for _ in range(repeats)) * 1e6
            rows.append(row)
            print(f"  measured paged x{scale} {regime}", file=sys.stderr, flush=True)
    return rows


def _paged_table(rows: list[dict]) -> str:
    head = (f"{'pool':>5} {'pages':>6} {'P':>4} {'regime':<8} {'bi us':>9} {'bi compile s':>12} "
            f"{'std(gather) us':>14} {'std compile s':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{'x' + str(r['scale']):>5} {r['n_pages']:>6} {r['pages_per_session']:>4} {r['regime']:<8} "
                     f"{r['batch_invariant_us']:>9.1f} {r['batch_invariant_compile_s']:>12.2f} "
                     f"{r['standard_us']:>14.1f} {r['standard_compile_s']:>13.2f}")
    return "\n".join(lines)


SEGMENT_ROWS = {  # name: (config, rows, row length, window, segment lengths of each row; the rest padding)
    "tiny 1 seg": ("tiny", 4, 512, None, [[448], [448], [384], [448]]),
    "tiny packed": ("tiny", 4, 512, None, [[128, 192, 128], [64, 256], [320, 128], [192, 64, 64, 128]]),
    "small 1 seg": ("small", 1, 1024, None, [[960]]),
    "small packed": ("small", 1, 1024, None, [[192, 320, 128, 256]]),
    "small packed w256": ("small", 1, 1024, 256, [[192, 320, 128, 256]]),
}
SEGMENT_VARIANTS = {"static plan": (False, None), "skip, 16/step": (True, 16), "skip, 64/step": (True, 64)}


def _packed_segments(B: int, T: int, lengths) -> jax.Array:
    """Segment ids [B, T]: row b holds segments 1, 2, ... of ``lengths[b]``, then padding (0)."""
    seg = np.zeros((B, T), np.int32)
    for b, lens in enumerate(lengths):
        edges = np.cumsum([0, *lens])
        for i in range(len(lens)):
            seg[b, edges[i]:edges[i + 1]] = i + 1
    return jnp.asarray(seg)


def _segment_program(seg, hq: int, hkv: int, hd: int, window, data_skip: bool, chunk):
    """jit of attention fwd + vjp on a full packed row through ``_bi_attention`` (the
    static plan, or skipping pairs without visible keys at ``chunk`` pairs per step)."""
    from . import split_kv_attention as ska
    from .split_kv import prepare, unprepare
    from .tiling import round_up

    T = seg.shape[1]
    key = (T, 0, round_up(T, 64), True, window, 64, True)

    def attend(q, k, v):
        L = ska._pad_rows(prepare(q, k, v, None, seg, seg, None, hd**-0.5, 64), round_up(T, ska.QUERY_BLOCK) * (hq // hkv))
        return unprepare(ska._bi_attention(L, True, window, 64, "reference", key, data_skip), q.shape, q.dtype)

    def run(q, k, v, dout):
        saved = ska.PAIRS_PER_STEP
        ska.PAIRS_PER_STEP = chunk or saved  # read while tracing
        try:
            out, vjp = jax.vjp(attend, q, k, v)
            return out, vjp(dout)
        finally:
            ska.PAIRS_PER_STEP = saved

    return jax.jit(run)


def _segment_case(name: str, spec, repeats: int, rng) -> dict:
    from .split_kv import prepare
    from .split_kv_attention import QUERY_BLOCK, _pad_rows, block_plan, visited_pairs
    from .tiling import round_up

    cfg, B, T, window, lengths = spec
    c = CONFIGS[cfg]
    hq, hkv, hd = c["hq"], c["hkv"], c["hd"]
    seg = _packed_segments(B, T, lengths)
    q, dout = _rand(rng, (B, T, hq, hd)), _rand(rng, (B, T, hq, hd))
    k, v = _rand(rng, (B, T, hkv, hd)), _rand(rng, (B, T, hkv, hd))
    plan = block_plan(T, 0, round_up(T, 64), True, window, 64)
    L = _pad_rows(prepare(q, k, v, None, seg, seg, None, 1.0, 64), round_up(T, QUERY_BLOCK) * (hq // hkv))
    _, count = visited_pairs(L, plan, True, window, 64)
    row = {"case": name, "rows": B, "row_length": T, "heads": f"{hq}/{hkv}", "head_dim": hd, "window": window,
           "segment_lengths": lengths, "plan_pairs_per_row": len(plan.pair_block),
           "visited_pairs": np.asarray(count).tolist()}
    fns = {}
    for variant, (data_skip, chunk) in SEGMENT_VARIANTS.items():
        fns[variant] = _segment_program(seg, hq, hkv, hd, window, data_skip, chunk)
        t0 = time.perf_counter()
        jax.block_until_ready(fns[variant](q, k, v, dout))
        row[f"{variant} compile_s"] = time.perf_counter() - t0
    samples = {variant: [] for variant in fns}
    for _ in range(repeats):
        for variant, fn in fns.items():
            samples[variant].append(_time_once(functools.partial(fn, q, k, v, dout), 1))
    for variant, times in samples.items():
        row[f"{variant} ms"] = min(times) * 1e3
    return row


def segment_skipping(repeats: int = 5) -> list[dict]:
    """Training-row attention forward + backward (``vjp``) on packed rows, the static
    plan (causal / window pairs, every one computed: the previous code) vs skipping the
    pairs without a visible key in the data (segments, padding) at 16 and 64 pairs per
    loop step; compiled first, then timed interleaved, min of ``repeats``."""
    rng = np.random.default_rng(0)
    rows = []
    for name, spec in SEGMENT_ROWS.items():
        rows.append(_segment_case(name, spec, repeats, rng))
        print(f"  measured segment skipping: {name}", file=sys.stderr, flush=True)
    return rows


def _segment_table(rows: list[dict]) -> str:
    head = f"{'case':<19}{'pairs/row plan':>15}{'visited':>18}" + "".join(f"{v + ' ms':>17}" for v in SEGMENT_VARIANTS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<19}{r['plan_pairs_per_row']:>15}{r['visited_pairs']!s:>18}"
                     + "".join(f"{r[v + ' ms']:>17.1f}" for v in SEGMENT_VARIANTS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m tml.kernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_results/kernels.json", help="JSON output path")
    ap.add_argument("--configs", default="tiny,small", help="comma-separated model configs")
    ap.add_argument("--repeats", type=int, default=7, help="timing samples per mode")
    ap.add_argument("--ops", default="", help="only these ops (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="few shapes, one sample (smoke test)")
    ap.add_argument("--paged", action="store_true",
                    help="only paged_attention against 1x, 4x, 16x pools (writes bench_results/kernels_paged.json)")
    ap.add_argument("--segments", action="store_true",
                    help="only training-row attention fwd+bwd on packed rows: static plan vs skipping pairs "
                         "without visible keys (writes bench_results/kernels_segments.json)")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    if args.segments:
        rows = segment_skipping(repeats)
        table = _segment_table(rows)
        print(table)
        result = {"meta": {**environment(), "repeats": repeats, "note": "attention fwd+bwd, min of interleaved"},
                  "results": rows, "table": table}
        out = args.out if args.out != "bench_results/kernels.json" else "bench_results/kernels_segments.json"
        if out:
            write_report(out, result)
        return result
    if args.paged:
        rows = paged_scaling(repeats)
        table = _paged_table(rows)
        print(table)
        result = {"meta": {**environment(), "repeats": repeats,
                           "note": "4 sessions x 512 keys, tiny heads, pages of 128; pools and page tables scaled"},
                  "results": rows, "table": table}
        out = args.out if args.out != "bench_results/kernels.json" else "bench_results/kernels_paged.json"
        if out:
            write_report(out, result)
        return result
    configs = [s for s in args.configs.split(",") if s]
    ops = {s for s in args.ops.split(",") if s}
    rows = []
    for name in configs:
        for case in _cases(name, CONFIGS[name], args.quick):
            if ops and case.op not in ops:
                continue
            rows.append(_measure(case, repeats))
            print(f"  measured {case.config} {case.op} {case.regime} {case.shape}", file=sys.stderr, flush=True)
    table = _table(rows)
    print(table)
    summary = _summary(rows)
    for regime, s in summary.items():
        print(
            f"{regime:<8} median ratio {s['median_ratio']:.2f}, max {s['max_ratio']:.2f} "
            f"(target <= {s['target']:.2f}; {s['cases_over_target']}/{s['cases']} cases over)"
        )
    result = {
        "meta": {
            **environment(),
            "repeats": repeats,
            "note": "ratio = batch_invariant / standard, medians of alternating samples",
        },
        "targets": TARGETS,
        "summary": summary,
        "results": rows,
        "table": table,
    }
    if args.out:
        write_report(args.out, result)
    return result


if __name__ == "__main__":
    main()
