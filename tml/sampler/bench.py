"""The sampler benchmark: ``python -m tml.sampler.bench [--quick] [--sections ...] [--sizes ...]``
→ a table and ``bench_results/sampler.json`` (``--sections ticks,pool,reprefill,minutes``
picks parts, ``--sizes tiny:1,tiny:16`` the tick-latency runs; the JSON records which).

Every figure is measured in both kernel modes in one run, **interleaved** (tick by tick,
the order alternating), so a load spike on the shared machine hits both alike; the
``batch_invariant`` / ``standard`` ratios stand beside the figures, and the issue's
targets beside those (a missed target is marked ``MISSED``).

* **Tick latency** (p50 / p99 of :meth:`Engine.tick`, after warm-up ticks that compile):
  1, 4, 16, 64 sessions of ``tiny`` (``recipes/model/tiny.yaml``) and 1, 4 of ``small``,
  fresh weights, temperature 1, every session appending one micro-turn of random dMel per
  tick. Fresh weights emit near-uniform text bytes, so every micro-turn runs to the output
  budget (``max_output_tokens`` = 16, the engine default: 1 prefill call + 16 decode calls
  per tick) — the worst case; ``decode_steps`` records it. The vocoder is off in the
  timed ticks and timed on its own (``vocoder_ms_per_speaking_micro_turn``): Griffin–Lim
  on the host is a per-speaking-session cost a server runs beside the model's tick.
* **Tick vs pool size**: one ``tiny`` session in engines that differ only in ``n_pages``
  (33 and 577: 2 and 36 MiB of KV), all four engines (modes x sizes) interleaved. The
  pools are donated and written in place, so the tick must not follow the pool.
* **Append vs re-prefill** at 10, 30, 60 s of conversation (``tiny``, one session): a
  session that keeps its KV pays one tick per micro-turn; a stateless server pays a
  prefill of the whole history (:meth:`Engine.load_history`, chunks of 512) plus that
  tick. ``speedup`` = re-prefill / the tick's own prefill (the micro-turn's inputs
  appended to the cache); ``speedup_whole_micro_turn`` = (re-prefill + tick) / tick, the
  decode steps included (both servers pay those).
* **Minute 1 vs minute 10**: one ``tiny`` engine per mode holds two sessions whose history
  was pre-filled (simulated, :meth:`Engine.load_history` of 300 and 3,000 random
  micro-turns: 1 and 10 minutes), ticked alternately; the same engine capacity for both.
* **Memory per session-minute**: KV bytes from the config (``2 · n_layers · n_kv_heads ·
  head_dim · itemsize`` per token, times the tokens of a minute of the random history)
  and the process's RSS growth over the timed ticks of the 16-session ``tiny`` run per
  session-minute served (host-side history: micro-turns, outputs; the KV pool is
  allocated up front, so it does not grow).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

MODES = ("batch_invariant", "standard")
BUDGET_MS = 200.0
TARGETS = {"tick_p99_ms_16_tiny": 50.0, "ratio": 1.25, "append_speedup_60s": 20.0, "minute10_over_minute1": 1.05}


def _rss() -> int:
    """Current resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _pct(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(a)}


def _model(name: str):
    from flax import nnx

    from tml.model.bench import load_recipe
    from tml.model.model import InteractionModel

    return InteractionModel(load_recipe(name), rngs=nnx.Rngs(0))


def _engine(model, mode: str, **kw):
    from tml import kernels
    from tml.sampler import Engine

    with kernels.kernel_mode(mode):
        return Engine(model, vocoder=False, **kw)


def _inputs(rng, n):
    from tml.sampler import TurnInputs

    return [TurnInputs(dmel=rng.integers(0, 16, (4, 80), dtype=np.uint8)) for _ in range(n)]


def _interleaved_ticks(engines: dict, sids: dict, n_ticks: int, warmup: int, rng, log, label: str,
                       on_warm=None) -> dict:
    """Tick every engine (one per mode) n_ticks + warmup times, alternating the mode order;
    each tick every session in ``sids[mode]`` appends one micro-turn."""
    from tml import kernels

    times = {m: [] for m in engines}
    steps = {m: [] for m in engines}
    n_sess = len(next(iter(sids.values())))
    feeds = [_inputs(rng, n_sess) for _ in range(n_ticks + warmup)]
    for t in range(n_ticks + warmup):
        if t == warmup and on_warm:
            on_warm()
        order = list(engines) if t % 2 == 0 else list(engines)[::-1]
        for m in order:
            eng = engines[m]
            with kernels.kernel_mode(m):
                for sid, inp in zip(sids[m], feeds[t]):
                    eng.append(sid, inp)
                t0 = time.perf_counter()
                outs = eng.tick()
                dt = (time.perf_counter() - t0) * 1e3
            if t >= warmup:
                times[m].append(dt)
                steps[m].append(max(len(o.tokens) for o in outs.values()))
    res = {m: {**_pct(times[m]), "decode_steps": float(np.mean(steps[m]))} for m in engines}
    log(f"  {label}: " + "  ".join(f"{m} p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms" for m, r in res.items()))
    return res


def bench_ticks(model, name: str, n: int, n_ticks: int, warmup: int, log, max_context: int | None = None) -> dict:
    rng = np.random.default_rng(n)
    max_context = max_context or 64 * -(-((n_ticks + warmup) * 26 + 64) // 64)
    engines = {m: _engine(model, m, max_sessions=n, max_context=max_context) for m in MODES}
    sids = {m: [e.open(seed=s) for s in range(n)] for m, e in engines.items()}
    rss = {}

    def mark():
        gc.collect()
        rss["start"] = _rss()

    res = _interleaved_ticks(engines, sids, n_ticks, warmup, rng, log, f"{name} x{n}", on_warm=mark)
    gc.collect()
    rss_growth = _rss() - rss["start"]
    session_minutes = 2 * n * n_ticks * 0.2 / 60   # both engines' sessions
    out = {"model": name, "sessions": n, "modes": res, "ratio_p50": res["batch_invariant"]["p50_ms"] /
           res["standard"]["p50_ms"], "ratio_p99": res["batch_invariant"]["p99_ms"] / res["standard"]["p99_ms"],
           "rss_growth_bytes_per_session_minute": rss_growth / session_minutes}
    del engines
    return out


def bench_pool_size(model, pool_pages: tuple[int, ...], n_ticks: int, warmup: int, log,
                    max_context: int = 1024) -> dict:
    """One ``tiny`` session ticked in engines that differ only in ``n_pages`` (same
    page-table width, same compiled shapes but the pool's): the tick must not grow with
    the pool. All engines (modes x pool sizes) interleaved tick by tick, order alternating."""
    from tml import kernels

    engines = {(m, n): _engine(model, m, max_sessions=1, max_context=max_context, n_pages=n)
               for n in pool_pages for m in MODES}
    sids = {key: e.open(seed=0) for key, e in engines.items()}
    feeds = _inputs(np.random.default_rng(5), n_ticks + warmup)
    times = {key: [] for key in engines}
    for t in range(n_ticks + warmup):
        order = list(engines) if t % 2 == 0 else list(engines)[::-1]
        for key in order:
            (m, _), eng = key, engines[key]
            with kernels.kernel_mode(m):
                eng.append(sids[key], feeds[t])
                t0 = time.perf_counter()
                eng.tick()
                dt = (time.perf_counter() - t0) * 1e3
            if t >= warmup:
                times[key].append(dt)
    res = {m: {str(n): {**_pct(times[(m, n)]), "pool_bytes": 2 * sum(a.nbytes for a in engines[(m, n)].k)}
               for n in pool_pages} for m in MODES}
    lo, hi = str(pool_pages[0]), str(pool_pages[-1])
    ratio = {m: res[m][hi]["p50_ms"] / res[m][lo]["p50_ms"] for m in MODES}
    log("  " + "  ".join(f"{m} {lo} pages p50 {res[m][lo]['p50_ms']:.1f} ms, {hi} pages "
                         f"{res[m][hi]['p50_ms']:.1f} ms ({ratio[m]:.2f}x)" for m in MODES))
    return {"pool_pages": list(pool_pages), "max_context": max_context, "modes": res, "ratio_p50": ratio}


def bench_vocoder(repeats: int) -> float:
    from tml.audio import waveform_from_dmel

    frames = np.random.default_rng(0).integers(0, 16, (4, 80), dtype=np.uint8)
    waveform_from_dmel(frames)
    t0 = time.perf_counter()
    for _ in range(repeats):
        waveform_from_dmel(frames)
    return (time.perf_counter() - t0) / repeats * 1e3


def _history(seconds: float, seed: int):
    from tml.model.bench import random_micro_turns

    return random_micro_turns(np.random.default_rng(seed), int(round(seconds * 5)), video_every=0)


def bench_append_vs_reprefill(model, seconds_list, n_ticks: int, log, max_context: int | None = None,
                              chunk_buckets=(16, 512)) -> list[dict]:
    from tml import kernels

    longest = len(_layout(_history(max(seconds_list), 0))) + 64 * (n_ticks + 2)
    kw = dict(max_sessions=1, max_context=max_context or 64 * -(-longest // 64), chunk_buckets=chunk_buckets)
    engines = {m: _engine(model, m, **kw) for m in MODES}
    # compile every prefill shape (a history longer than the largest bucket, with a
    # remainder above the smallest) and the tick's programs before timing anything
    warm = _history(1, 99)
    while len(_layout(warm)) <= chunk_buckets[-1] or len(_layout(warm)) % chunk_buckets[-1] <= chunk_buckets[0]:
        warm = warm + _history(1, len(warm))
    for m, e in engines.items():
        with kernels.kernel_mode(m):
            sid = e.open(seed=0)
            e.load_history(sid, warm)
            e.step(sid, _inputs(np.random.default_rng(0), 1)[0])
            e.close(sid)
    rows = []
    for secs in seconds_list:
        hist = _history(secs, int(secs))
        res = {}
        for m in (MODES if secs % 20 else MODES[::-1]):
            e = engines[m]
            with kernels.kernel_mode(m):
                sid = e.open(seed=1)
                t0 = time.perf_counter()
                e.load_history(sid, hist)
                reprefill = (time.perf_counter() - t0) * 1e3
                ticks, prefills = [], []
                prefill = e._prefill                 # time the tick's prefill part on its own

                def timed(*a, _f=prefill):
                    t1 = time.perf_counter()
                    r = _f(*a)
                    prefills.append((time.perf_counter() - t1) * 1e3)
                    return r

                e._prefill = timed
                for inp in _inputs(np.random.default_rng(1), n_ticks):
                    e.append(sid, inp)
                    t0 = time.perf_counter()
                    e.tick()
                    ticks.append((time.perf_counter() - t0) * 1e3)
                del e._prefill
                e.close(sid)
            append, append_prefill = float(np.median(ticks)), float(np.median(prefills))
            res[m] = {"reprefill_ms": reprefill, "append_tick_ms": append, "append_prefill_ms": append_prefill,
                      "speedup": reprefill / append_prefill,
                      "speedup_whole_micro_turn": (reprefill + append) / append}
        rows.append({"seconds": secs, "history_tokens": len(_layout(hist)), "modes": res})
        log(f"  {secs:>4} s: " + "  ".join(f"{m} re-prefill {r['reprefill_ms']:.0f} ms, append prefill "
                                           f"{r['append_prefill_ms']:.1f} ms ({r['speedup']:.0f}x), tick "
                                           f"{r['append_tick_ms']:.1f} ms ({r['speedup_whole_micro_turn']:.1f}x)"
                                           for m, r in res.items()))
    return rows


def _layout(turns):
    from tml.stream import layout

    return layout(turns)


def bench_minutes(model, minutes: tuple[float, float], n_ticks: int, log, max_context: int | None = None,
                  chunk_buckets=(16, 32, 64, 512)) -> dict:
    from tml import kernels

    hists = [_history(60 * mins, 7 + i) for i, mins in enumerate(minutes)]
    longest = len(_layout(hists[-1])) + 64 * (n_ticks + 4)
    kw = dict(max_sessions=2, max_context=max_context or 64 * -(-longest // 64), chunk_buckets=chunk_buckets)
    engines = {m: _engine(model, m, **kw) for m in MODES}
    sids = {}
    for m, e in engines.items():
        with kernels.kernel_mode(m):
            sids[m] = [e.open(seed=i) for i in range(2)]
            for sid, h in zip(sids[m], hists):
                e.load_history(sid, h)
    res = {}
    for i, mins in enumerate(minutes):
        one = {m: [sids[m][i]] for m in MODES}
        res[f"minute_{mins:g}"] = _interleaved_ticks(engines, one, n_ticks, 2, np.random.default_rng(i), log,
                                                     f"minute {mins:g} ({len(_layout(hists[i]))} tokens)")
    a, b = (res[f"minute_{m:g}"] for m in minutes)
    res["ratio_p50"] = {m: b[m]["p50_ms"] / a[m]["p50_ms"] for m in MODES}
    res["ratio_p99"] = {m: b[m]["p99_ms"] / a[m]["p99_ms"] for m in MODES}
    res["history_tokens"] = [len(_layout(h)) for h in hists]
    res["simulated"] = "history pre-filled with Engine.load_history (random micro-turns, audio only)"
    return res


def kv_bytes_per_minute(cfg, tokens_per_minute: float) -> float:
    import jax.numpy as jnp

    itemsize = jnp.dtype(cfg.compute_dtype()).itemsize
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize * tokens_per_minute


def _flag(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def format_table(report: dict) -> str:
    """The report as a text table; sections missing from ``report`` (``--sections``) are left out."""
    lines = []
    if report.get("ticks"):
        lines += _ticks_table(report)
    if report.get("pool_size"):
        ps = report["pool_size"]
        lo, hi = (str(n) for n in (ps["pool_pages"][0], ps["pool_pages"][-1]))
        lines.append("")
        lines.append(f"tick vs pool size (tiny x1, {ps['max_context']} slots/session): " + "  ".join(
            f"{m} {lo} pages p50 {ps['modes'][m][lo]['p50_ms']:.1f} ms, {hi} pages {ps['modes'][m][hi]['p50_ms']:.1f} ms "
            f"({ps['ratio_p50'][m]:.2f}x)" for m in MODES))
    if report.get("append_vs_reprefill"):
        lines += _reprefill_table(report)
    if report.get("minutes"):
        lines += _minutes_table(report)
    if report.get("memory"):
        mem = report["memory"]
        lines.append("")
        lines.append(f"memory per session-minute ({mem['model']}): KV {mem['kv_bytes_per_minute'] / 2**20:.2f} MiB "
                     f"({mem['tokens_per_minute']:.0f} tokens/min), measured RSS growth "
                     f"{mem['rss_growth_bytes_per_session_minute'] / 2**20:.2f} MiB (host history; the pool is "
                     "preallocated)")
    return "\n".join(lines)


def _ticks_table(report: dict) -> list[str]:
    lines = [f"{'tick latency':<22}{'bi p50':>9}{'bi p99':>9}{'std p50':>9}{'std p99':>9}{'ratio p50':>11}"
             f"{'ratio p99':>11}{'steps':>7}  budget {BUDGET_MS:.0f} ms"]
    for r in report["ticks"]:
        bi, st = r["modes"]["batch_invariant"], r["modes"]["standard"]
        note = ""
        if r["model"] == "tiny" and r["sessions"] == 16:
            note = (f"  target p99 <= {TARGETS['tick_p99_ms_16_tiny']:.0f} ms: "
                    f"{_flag(bi['p99_ms'] <= TARGETS['tick_p99_ms_16_tiny'])}")
        lines.append(f"{r['model'] + ' x' + str(r['sessions']):<22}{bi['p50_ms']:>9.1f}{bi['p99_ms']:>9.1f}"
                     f"{st['p50_ms']:>9.1f}{st['p99_ms']:>9.1f}{r['ratio_p50']:>11.2f}{r['ratio_p99']:>11.2f}"
                     f"{bi['decode_steps']:>7.0f}{note}")
    worst = max(r["ratio_p50"] for r in report["ticks"])
    lines.append(f"worst batch_invariant/standard p50 ratio {worst:.2f} (target <= {TARGETS['ratio']}: "
                 f"{_flag(worst <= TARGETS['ratio'])})")
    lines.append(f"vocoder (Griffin-Lim, host): {report['vocoder_ms_per_speaking_micro_turn']:.1f} ms per speaking "
                 "micro-turn (not in the ticks above)")
    return lines


def _reprefill_table(report: dict) -> list[str]:
    lines = [""]
    lines.append("append vs re-prefill: re-prefill of the history vs the micro-turn's own prefill (x), and vs the")
    lines.append("whole micro-turn with its decode, which a re-prefilling server pays as well (x tick)")
    lines.append(f"{'':<8}{'tokens':>8}{'bi re-pf':>10}{'bi app':>8}{'bi x':>7}{'bi tick':>9}{'x tick':>8}"
                 f"{'std re-pf':>11}{'std app':>9}{'std x':>7}{'x tick':>8}")
    for r in report["append_vs_reprefill"]:
        bi, st = r["modes"]["batch_invariant"], r["modes"]["standard"]
        note = ""
        if r["seconds"] == 60:
            note = f"  target >= {TARGETS['append_speedup_60s']:.0f}x: {_flag(bi['speedup'] >= TARGETS['append_speedup_60s'])}"
        lines.append(f"{str(r['seconds']) + ' s':<8}{r['history_tokens']:>8}{bi['reprefill_ms']:>10.0f}"
                     f"{bi['append_prefill_ms']:>8.1f}{bi['speedup']:>7.1f}{bi['append_tick_ms']:>9.1f}"
                     f"{bi['speedup_whole_micro_turn']:>8.1f}{st['reprefill_ms']:>11.0f}{st['append_prefill_ms']:>9.1f}"
                     f"{st['speedup']:>7.1f}{st['speedup_whole_micro_turn']:>8.1f}{note}")
    return lines


def _minutes_table(report: dict) -> list[str]:
    mm = report["minutes"]
    keys = [k for k in mm if k.startswith("minute_")]
    lines = [""]
    lines.append(f"{'minute 1 vs 10 (sim.)':<22}{'tokens':>8}{'bi p50':>9}{'bi p99':>9}{'std p50':>9}{'std p99':>9}")
    for k, toks in zip(keys, mm["history_tokens"]):
        bi, st = mm[k]["batch_invariant"], mm[k]["standard"]
        lines.append(f"{k.replace('_', ' '):<22}{toks:>8}{bi['p50_ms']:>9.1f}{bi['p99_ms']:>9.1f}{st['p50_ms']:>9.1f}"
                     f"{st['p99_ms']:>9.1f}")
    r = mm["ratio_p50"]["batch_invariant"]
    lines.append(f"{'ratio (p50)':<22}{'':>8}{r:>9.2f}{'':>9}{mm['ratio_p50']['standard']:>9.2f}"
                 f"   target <= {TARGETS['minute10_over_minute1']}: {_flag(r <= TARGETS['minute10_over_minute1'])}")
    return lines


SECTIONS = ("ticks", "pool", "reprefill", "minutes")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tml.sampler.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_results/sampler.json", help="JSON output path")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny x1 only, 2 ticks, a 2 s history, minutes 0.05 / 0.1, shared compiled shapes")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default all; memory needs ticks and "
                        "minutes)")
    p.add_argument("--sizes", default=None,
                   help="tick-latency runs as model:sessions, comma-separated (default tiny:1,tiny:4,tiny:16,"
                        "tiny:64,small:1,small:4)")
    args = p.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    if not sections or set(sections) - set(SECTIONS):
        p.error(f"--sections {args.sections!r}: choose from {','.join(SECTIONS)}")

    from tml.bench_report import environment, write_report

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    q = args.quick
    # --quick: every engine the same page-table width and chunk buckets, so the few compiled
    # programs (per mode: prefill 16 and 64, decode) are shared by all its measurements
    shared = {"max_context": 1024} if q else {}
    hist_kw = {**shared, "chunk_buckets": (16, 64)} if q else {}
    tiny = _model("tiny")
    models = {"tiny": tiny}
    report = {"benchmark": "sampler", "quick": q, "sections": sections, "environment": environment(),
              "budget_ms": BUDGET_MS, "targets": TARGETS}
    if "ticks" in sections:
        sizes = [("tiny", 1)] if q else [("tiny", 1), ("tiny", 4), ("tiny", 16), ("tiny", 64),
                                                      ("small", 1), ("small", 4)]
        if args.sizes:
            try:
                sizes = [(name, int(n)) for name, n in (x.split(":") for x in args.sizes.split(","))]
            except ValueError:
                p.error(f"--sizes {args.sizes!r}: write model:sessions pairs, e.g. tiny:1,tiny:16")
        ticks = []
        log("tick latency (interleaved modes):")
        for name, n in sizes:
            if name not in models:
                models[name] = _model(name)
            n_ticks = 2 if q else (30 if name == "tiny" and n <= 16 else 15)
            ticks.append(bench_ticks(models[name], name, n, n_ticks, 1 if q else 3, log, **shared))
        report["ticks"] = ticks
        report["vocoder_ms_per_speaking_micro_turn"] = bench_vocoder(2 if q else 20)
    if "pool" in sections:
        log("tick vs pool size (tiny, 1 session, interleaved):")
        # --quick: 17 pages is the tick engines' own pool (1 session x 1024 slots + the reserved page)
        report["pool_size"] = bench_pool_size(tiny, (17, 161) if q else (33, 577), 2 if q else 12, 1 if q else 2, log)
    if "reprefill" in sections:
        log("append vs re-prefill (tiny, 1 session):")
        seconds = (2,) if q else (10, 30, 60)
        report["append_vs_reprefill"] = bench_append_vs_reprefill(tiny, seconds, 2 if q else 7, log, **hist_kw)
    if "minutes" in sections:
        log("minute 1 vs minute 10 (tiny, simulated history):")
        minutes = bench_minutes(tiny, (0.05, 0.1) if q else (1, 10), 2 if q else 25, log, **hist_kw)
        report["minutes"] = minutes
        if "ticks" in sections:
            tok_min = minutes["history_tokens"][0] / (0.05 if q else 1)
            ref = next((t for t in report["ticks"] if t["model"] == "tiny" and t["sessions"] == (1 if q else 16)),
                       report["ticks"][0])
            report["memory"] = {"model": "tiny", "tokens_per_minute": tok_min,
                                "kv_bytes_per_minute": kv_bytes_per_minute(tiny.cfg, tok_min),
                                "rss_growth_bytes_per_session_minute": ref["rss_growth_bytes_per_session_minute"],
                                "rss_from": f"tiny x{ref['sessions']} timed ticks"}
    report["notes"] = ["fresh weights: every micro-turn decodes to the 16-token output budget (worst case)",
                       "vocoder off in the timed ticks (timed separately)",
                       "minute 10 simulated by pre-filling 10 minutes of random history (Engine.load_history)"]
    print(format_table(report))
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
