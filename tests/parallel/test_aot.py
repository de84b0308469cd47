"""The pod plan (tml.parallel.aot): a small config compiled ahead of time for a 2x2
topology — TPU v5e 2x2 through libtpu when it is installed (``tml[tpu-aot]``), and its
stand-in (4 fake CPU devices, same fsdp=2 x expert=2 mesh) always — gives the table's
rows with per-device memory and the step's collectives."""

import json
import os
import subprocess
import sys

import pytest

from tml.parallel import aot

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
         "model.d_ff=64", "model.n_experts=4", "model.top_k=2", "model.d_expert=32", "model.vision_layers=2",
         "parallel.mesh.data=1", "parallel.mesh.fsdp=2", "parallel.mesh.expert=2",
         "train.batch_size=4", "loader.row_length=128", "loader.max_patches_per_row=4"]
ROWS = ["parameters / device", "optimizer state / device", "arguments", "outputs", "temporaries (activations)",
        "peak device memory (compiler)",
        *(f"{k} bytes / step (ops run)" for k in aot.COLLECTIVES), "compile time (trace + lower + compile)"]


def _plan(tmp_path, *flags):
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "-m", "tml.parallel.aot", *SMALL, "--topology", "v5e:2x2", *flags,
                        "--out", str(out)], check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (plan,) = json.loads(out.read_text())["plans"].values()
    assert aot.plan_key(plan).endswith("--fake-cpu 4" if "--fake-cpu" in flags else "--topology v5e:2x2")
    return plan, r.stdout


def _check(plan, table):
    assert plan["devices"] == 4 and plan["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 2}
    assert [row[0] for row in aot.table_rows(plan)] == ROWS
    for row in ROWS:
        assert f"| {row} |" in table
    total, per = plan["parameters"]["bytes_total"], plan["parameters"]["bytes_per_device"]
    assert 0 < per < total  # sharded over fsdp x expert
    assert plan["optimizer"]["bytes_per_device"] >= 2 * per * 0.99  # Adam: mu and nu like the params
    grads = plan["programs"]["gradients"]
    assert grads["memory"]["temporaries"] > 0
    assert grads["collectives"]["all-gather"]["bytes"] > 0  # FSDP gathers the weights
    for prog in plan["programs"].values():
        for kind in aot.COLLECTIVES:
            c = prog["collectives"][kind]
            assert c["step_count"] >= c["count"] and c["step_bytes"] >= c["bytes"]  # loops run >= once
        assert set(prog["seconds"]) == {"trace", "lower", "compile"} and prog["seconds"]["compile"] > 0


def test_plan_on_fake_cpu_devices(tmp_path):
    plan, table = _plan(tmp_path, "--fake-cpu", "4")
    assert plan["platform"] == "cpu" and "stand-in" in table
    _check(plan, table)


@pytest.mark.skipif(not aot.have_libtpu() and os.environ.get("CI") != "true",
                    reason="libtpu not installed (pip install 'tml[tpu-aot]'); CI installs it")
@pytest.mark.parametrize("how", [[], ["model.scan_layers=true", "model.remat=true"]], ids=["unrolled", "scanned"])
def test_plan_on_a_tpu_v5e_2x2_topology(tmp_path, how):
    assert aot.have_libtpu(), "CI=true: libtpu must be installed (.ci/run installs tml[tpu-aot])"
    plan, table = _plan(tmp_path, *how)
    assert plan["platform"] == "tpu" and "TPU" in plan["device_kind"]
    _check(plan, table)
    for prog in plan["programs"].values():  # the TPU compiler's own peak: arguments and outputs are in it
        assert prog["memory"]["peak"] >= prog["memory"]["arguments"] > 0


def test_collective_bytes_reads_operand_sizes():
    hlo = """
  %p = bf16[256,512]{1,0} parameter(0)
  %ag = bf16[1024,512]{1,0} all-gather(%p), dimensions={0}
  %ars = f32[8]{0} all-reduce-start(%x), to_apply=%add
  %x = f32[8]{0} add(%a, %b)
  %ard = f32[8]{0} all-reduce-done(%ars)
  ROOT %a2a = (f32[4,4]{1,0}, f32[4,4]{1,0}) all-to-all(%u, %v), dimensions={0}
  %u = f32[4,4]{1,0} parameter(1)
  %v = f32[4,4]{1,0} parameter(2)
"""
    out = aot.collective_bytes(hlo)
    once = lambda n, b: {"count": n, "bytes": b, "step_count": n, "step_bytes": b}
    assert out["all-gather"] == once(1, 256 * 512 * 2)
    assert out["all-reduce"] == once(1, 32)
    assert out["all-to-all"] == once(1, 2 * 64)
    assert out["reduce-scatter"] == once(0, 0)


def test_collective_bytes_multiplies_loop_bodies_by_their_trip_count():
    """A collective inside a while body runs trip-count times per step (nested loops
    multiply); a loop without a known trip count counts once and is reported."""
    hlo = """HloModule m, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%inner (p.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.1 = (s32[], f32[8]{0}) parameter(0)
  %x.1 = f32[8]{0} get-tuple-element(%p.1), index=1
  %ar.1 = f32[8]{0} all-reduce(%x.1), to_apply=%add
  ROOT %t.1 = (s32[], f32[8]{0}) tuple(%i.1, %ar.1)
}

%outer (p.2: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.2 = (s32[], f32[8]{0}) parameter(0)
  %w.2 = (s32[], f32[8]{0}) while(%p.2), condition=%cond, body=%inner, backend_config={"known_trip_count":{"n":"5"}}
  %y.2 = f32[8]{0} get-tuple-element(%w.2), index=1
  %ag.2 = f32[32]{0} all-gather(%y.2), dimensions={0}
  ROOT %t.2 = (s32[], f32[8]{0}) tuple(%i.2, %y.2)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w.3 = (s32[], f32[8]{0}) while(%t.0), condition=%cond, body=%outer, backend_config={"known_trip_count":{"n":"3"}}
  %w.4 = (s32[], f32[8]{0}) while(%t.0), condition=%cond, body=%dyn
  ROOT %r = f32[8]{0} all-reduce(%a), to_apply=%add
}

%dyn (p.5: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.5 = (s32[], f32[8]{0}) parameter(0)
  %x.5 = f32[8]{0} get-tuple-element(%p.5), index=1
  %cp.5 = f32[8]{0} collective-permute(%x.5), source_target_pairs={{0,1}}
  ROOT %t.5 = (s32[], f32[8]{0}) tuple(%i.5, %cp.5)
}
"""
    out = aot.collective_bytes(hlo)
    assert out["all-reduce"] == {"count": 2, "bytes": 64, "step_count": 3 * 5 + 1, "step_bytes": 16 * 32}
    assert out["all-gather"] == {"count": 1, "bytes": 32, "step_count": 3, "step_bytes": 96}
    assert out["collective-permute"] == {"count": 1, "bytes": 32, "step_count": 1, "step_bytes": 32}
    assert out["loops"] == {"unknown_trip_counts": 1}


def test_a_program_that_does_not_fit_is_reported_not_raised():
    """The TPU compiler's out-of-memory error becomes the plan's "does not fit" row with the
    temporaries it asked for; any other error propagates."""

    class Stage:
        def __init__(self, error):
            self.error = error

        def trace(self, *args):
            return self

        def lower(self):
            return self

        def compile(self):
            raise RuntimeError(self.error)

    oom = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(416.71G) exceeds available HBM (95.74G).")
    p = aot._program(Stage(oom))
    assert p["temporaries_required"] == pytest.approx(416.71 * 2**30)
    assert set(p["seconds"]) == {"trace", "lower", "compile"} and "RESOURCE_EXHAUSTED" in p["error"]
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        aot._program(Stage("INVALID_ARGUMENT: something else"))


def test_trip_count_inferred_from_the_loop_condition():
    """The TPU compiler prints no known_trip_count: the bound of the condition's
    ``compare(counter, constant), direction=LT`` less the counter's init (a copy of a
    constant) gives it; a condition of another form leaves the loop unknown (counted once)."""
    hlo = """
%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(17)
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%odd (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  ROOT %b = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %zero = s32[]{:T(128)} constant(1)
  %start = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, f32[8]{0}) tuple(%start, %a)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %w2 = (s32[], f32[8]) while(%init), condition=%odd, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""
    out = aot.collective_bytes(hlo)
    assert out["all-reduce"]["count"] == 1 and out["all-reduce"]["step_count"] == 16 + 1
    assert out["all-reduce"]["step_bytes"] == 17 * 32
    assert out["loops"] == {"unknown_trip_counts": 1}
