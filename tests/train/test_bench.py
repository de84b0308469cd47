"""The training-throughput benchmark runs end to end and writes its JSON (a smoke run on
tiny shapes: no speed is asserted), and its peak-RSS probe reads a child's memory."""

import json
import math
import sys

from tml.train import bench


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    result = bench.main(["--quick", "--no-memory", "--models", "tiny", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(result["results"]))
    assert positive(data["peak_flops"]) and data["memory"] is None
    (r,) = data["results"]
    assert r["model"] == "tiny"
    rows, length, patches = bench.QUICK_SHAPE
    assert r["shape"] | {"rows": rows, "row_length": length, "patches_per_row": patches} == r["shape"]
    assert r["tokens_per_step"] == rows * length
    assert positive(r["model_flops_per_step"]) and r["model_flops_per_step"] < r["six_n_active_flops_per_step"]
    assert positive(r["ratio_batch_invariant_over_standard"])
    for mode in bench.MODES:
        m = r["modes"][mode]
        for key in ("step_s_median", "step_s_best", "tokens_per_s", "mfu", "compile_s", "first_step_s",
                    "attention_s_median", "attention_share"):
            assert positive(m[key]), (mode, key, m[key])
        assert math.isfinite(m["last_loss"])
        assert m["compiled_while_timing"] == [], (mode, m["compiled_while_timing"])  # timed what was compiled
        assert m["attention_share"] == m["attention_s_median"] / m["step_s_median"]
    assert "ratio" in capsys.readouterr().out and "attn" in data["table"][0]


def test_attention_program_is_the_steps_attention_calls(monkeypatch):
    """One kernel call per (decoder layer, micro-batch) at the step's shapes, windows from
    the layer types, fed the batch's segments; forward and gradients of q, k, v."""
    import jax
    import numpy as np

    from tml import kernels

    cfg = bench.compose_recipe(["model=small"]).model
    seg = np.repeat(np.array([[1] * 100 + [2] * 60 + [0] * 32]), 4, axis=0)
    fn, args = bench.make_attention_program(cfg, seg, micro=2)
    q, k, v, dout, s = args
    assert q.shape == (cfg.n_layers, 2, 2, 192, cfg.n_heads, cfg.head_dim) and dout.shape == q.shape
    assert k.shape == v.shape == (cfg.n_layers, 2, 2, 192, cfg.n_kv_heads, cfg.head_dim)
    assert (np.asarray(s).reshape(4, 192) == seg).all()
    calls, attention = [], kernels.attention

    def counted(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw["sliding_window"], kw["q_segment_ids"] is kw["kv_segment_ids"]))
        return attention(q, k, v, **kw)

    monkeypatch.setattr(kernels, "attention", counted)
    res = jax.eval_shape(fn, *args)
    windows = [cfg.sliding_window if t == "sliding" else None for t in cfg.resolved_layer_types()]
    assert calls == [((2, 192, cfg.n_heads, cfg.head_dim), (2, 192, cfg.n_kv_heads, cfg.head_dim), w, True)
                     for w in windows for _ in range(2)]
    assert len(res) == cfg.n_layers * 2 and [x.shape for x in res[0]] == [q.shape[2:], q.shape[2:], k.shape[2:],
                                                                          v.shape[2:]]


def test_peak_rss_is_the_childs_own(tmp_path):
    """300 MiB in the child, while this process holds 512 MiB more: the child's own peak
    (``ru_maxrss`` would include the parent's pages copied before ``exec``). The peak is
    polled, so the child lingers a moment as a training run does."""
    import numpy as np

    held = np.ones(2**26)                                           # 512 MiB, touched
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    res = bench.run_and_measure_rss([sys.executable, "-c", code], log_path=tmp_path / "log")
    assert res["returncode"] == 0 and held[-1] == 1
    assert 0.29 < res["peak_rss_gib"] < 0.6, res
