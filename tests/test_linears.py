"""Routing a model's linear layers to ops.linear where it pays (ops.linear_pays), and only there."""

import json

import pytest
import torch
import torch.nn.functional as F

from cllm_rt import ops
from cllm_rt.runtime.linears import routed_linears
from tiny_models import tiny_model

native = pytest.mark.skipif(not ops.native_available(), reason="native extension not built")


def plan(monkeypatch, *pays: bool, tree_pays: bool = True):
    """Pretend linear_plan measured ``pays`` (rows 1 .. LINEAR_MIN_ROWS - 1) and ``tree_pays`` for every dtype."""
    plan_in_force = ops.LinearPlan((False, False, False), ("wide", "wide"), pays, tree_pays, {})
    monkeypatch.setattr(ops, "_plan_in_force", lambda dtype: plan_in_force)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_plan_measures_every_choice_once_and_follows_its_medians(dtype):
    measured = ops.linear_plan(dtype)
    ms = measured.ms
    assert len(measured.pays) == ops.LINEAR_MIN_ROWS - 1 and all(t > 0 for t in ms.values())
    def target(call):  # L2 only where it measured the margin faster than non-temporal
        return "l2" if ms[f"{call} l2"] < ops._PREFETCH_L2_MARGIN * ms[f"{call} non-temporal"] else "non-temporal"

    def best(call):
        return ms[f"{call} {target(call)}"]

    tree = f"wide {ops._PREFETCH_ROWS}"
    for rows, shape in enumerate(measured.tiles, 1):  # the fastest shape, unless within the margin of wide tiles
        shapes = ops.TILE_SHAPES if rows == 1 else ops._TWO_ROW_SHAPES
        fastest = min(shapes, key=lambda s: best(f"{s} {rows}"))
        assert shape == (fastest if best(f"{fastest} {rows}") < ops._TILE_MARGIN * best(f"wide {rows}") else "wide")
    # each row count prefetches where its shape measured faster; 3 rows and more as a tree's calls
    few_rows = tuple(target(f"{shape} {rows}") == "l2" for rows, shape in enumerate(measured.tiles, 1))
    assert measured.prefetch_l2 == (*few_rows, target(tree) == "l2")
    assert "paired 2 l2" not in ms and "paired 2 non-temporal" not in ms  # one row read twice: a one-row shape
    for rows, pays in enumerate(measured.pays, 1):
        ours = best(f"{measured.tiles[rows - 1]} {rows}") if rows <= 2 else ms[f"wide {rows}"]
        assert pays == (ours < ops._SMALL_ROW_MARGIN * ms[f"torch {rows}"])
    assert measured.tree_pays == (best(tree) < ops._SMALL_ROW_MARGIN * ms[f"torch {ops._PREFETCH_ROWS}"])
    assert ops.linear_plan(dtype) is measured  # cached per dtype and thread count


@native
def test_the_plan_is_kept_per_machine_and_the_first_published_plan_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("CLLM_RT_CACHE", str(tmp_path))
    ops._cached_plan.cache_clear()
    try:
        measured = ops.linear_plan(torch.float32)
        path = ops._plan_file(torch.float32, torch.get_num_threads())
        assert path.parent == tmp_path / "linear-plans" and ops._read_plan(path) == measured
        # a plan another process published is the one every later process uses
        tiles = ("paired", "tall") if measured.tiles != ("paired", "tall") else ("streamed", "wide")
        other = ops.LinearPlan(tuple(not p for p in measured.prefetch_l2), tiles,
                               tuple(not p for p in measured.pays), not measured.tree_pays, {"torch 1": 1.0})
        path.write_text(json.dumps(other._asdict()))
        ops._cached_plan.cache_clear()
        assert ops.linear_plan(torch.float32) == other
        # from here on a measurement is a fake one, each call another plan: what follows is about the file
        measurements = []

        def measure(dtype):
            measurements.append(measured._replace(ms={"measurement": len(measurements) + 1.0}))
            return measurements[-1]

        monkeypatch.setattr(ops, "_measure_plan", measure)
        # an unreadable file is measured again and replaced, leaving no scratch file; so is a file naming a shape
        # the kernel lacks (paired at two rows), and one of a single prefetch target (as _PLAN_METHOD 4 measured)
        for unreadable in ("{", json.dumps({**other._asdict(), "tiles": ["wide", "paired"]}),
                           json.dumps({**other._asdict(), "prefetch_l2": True}),
                           json.dumps({**other._asdict(), "prefetch_l2": [True, False]})):
            path.write_text(unreadable)
            ops._cached_plan.cache_clear()
            again = ops.linear_plan(torch.float32)
            assert again == measurements[-1] and ops._read_plan(path) == again, unreadable
            assert [p.name for p in path.parent.iterdir()] == [path.name]
        assert len(measurements) == 4
        # no writable cache: the process's own measurement
        monkeypatch.setenv("CLLM_RT_CACHE", str(path))  # a file, not a directory
        ops._cached_plan.cache_clear()
        assert ops.linear_plan(torch.float32) == measurements[-1] and len(measurements) == 5
    finally:
        ops._cached_plan.cache_clear()  # later tests read the real cache again


def test_the_last_level_cache_is_read_from_sysfs_and_odd_sizes_are_skipped(tmp_path):
    for name, size in (("index0", "48K"), ("index2", "2M"), ("index3", "1G"), ("index4", ""), ("index5", "big")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    assert ops._last_level_cache_bytes(str(tmp_path)) == 2**30
    (tmp_path / "index3" / "size").write_text("32768K")
    assert ops._last_level_cache_bytes(str(tmp_path)) == 32 * 2**20
    assert ops._last_level_cache_bytes(str(tmp_path / "none")) == 0


@native
def test_linear_plan_refuses_a_dtype_without_a_kernel():
    with pytest.raises(ValueError, match="float32, float64 or bfloat16, got torch.float16"):
        ops.linear_plan(torch.float16)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_tuning_does_not_change_a_bit(dtype):
    """Every tile shape sums each output in the same order, and a prefetch only moves data (csrc/cpu/linear.h),
    so the measured choices cannot change a token."""
    x, weights = torch.randn(9, 200, dtype=dtype), [torch.randn(50, 200, dtype=dtype), torch.randn(7, 200, dtype=dtype)]
    try:
        results = {}
        for shape in ops.TILE_SHAPES:
            for prefetch_l2 in ((True,) * 3, (False,) * 3, (True, False, True), (False, True, False)):
                ops._set_tuning(dtype, (shape, shape), prefetch_l2)
                results[shape, prefetch_l2] = [ops.linear(x[:rows], weights) for rows in (1, 2, 9)]
    finally:
        ops.linear_plan(dtype)  # the measured choice again
    assert len(results) == 4 * len(ops.TILE_SHAPES)
    first = results["tall", (True,) * 3]
    for other in results.values():
        for a, b in zip(first, other):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
    for rows in (1, 2):  # and a row's bits do not depend on the other rows
        assert torch.equal(first[rows - 1][0][0], first[2][0][0])
    with pytest.raises(ValueError, match="no linear kernel for dtype int8"):
        ops._C.set_linear_tuning("int8", 2, 2, (False, False, False))
    for one_row, two_rows in ((4, 0), (0, 3), (-1, 0)):  # paired (3) is a one-row shape
        with pytest.raises(ValueError, match=rf"or, for one row, 3 \(paired\); got {one_row} and {two_rows}$"):
            ops._C.set_linear_tuning("float32", one_row, two_rows, (False, False, False))


@native
def test_every_routed_call_and_int8_linear_runs_with_the_plan_s_tuning():
    """The prefetch targets apply at every row count, so a routed call of a tree's rows sets the plan's tuning
    too, not only the few-row calls that read ``pays``."""
    measured = ops.linear_plan(torch.float32)
    try:
        other = tuple(next(s for s in ops.TILE_SHAPES if s != shape) for shape in measured.tiles)
        flipped = tuple(not p for p in measured.prefetch_l2)
        ops._set_tuning(torch.float32, other, flipped)
        assert ops.linear_pays(torch.randn(ops.LINEAR_MIN_ROWS, 16)) == measured.tree_pays
        assert ops._tuning_set[torch.float32] == (measured.tiles, measured.prefetch_l2)
        # and an int8 model's linears, which call the kernel directly
        ops._set_tuning(torch.float32, other, flipped)
        q, scale = torch.ones(4, 16, dtype=torch.int8), torch.ones(4)
        ops.linear_int8_unchecked(torch.randn(1, 16), [q], [scale], [None])
        assert ops._tuning_set[torch.float32] == (measured.tiles, measured.prefetch_l2)
    finally:
        ops.linear_plan(torch.float32)


@native
@pytest.mark.parametrize("amx", [False, True], ids=["no_amx", "amx"])
def test_bf16_trees_route_as_measured_and_with_amx_only_up_to_8_rows(amx, monkeypatch):
    monkeypatch.setattr(ops, "cpu_has_amx_bf16", lambda: amx)
    plan(monkeypatch, True, False, True)
    def pays(rows):
        return ops.linear_pays(torch.randn(rows, 16, dtype=torch.bfloat16))
    assert pays(ops.LINEAR_MIN_ROWS) and pays(ops._PREFETCH_ROWS)
    assert pays(ops._PREFETCH_ROWS + 1) == pays(ops.LINEAR_MAX_ROWS) == (not amx)
    # fewer rows as measured, whatever the CPU
    assert [pays(rows) for rows in (1, 2, 3)] == [True, False, True]
    assert not pays(ops.LINEAR_MAX_ROWS + 1)
    plan(monkeypatch, True, False, True, tree_pays=False)  # torch measured faster at a tree's rows
    assert not pays(ops.LINEAR_MIN_ROWS) and not pays(ops._PREFETCH_ROWS) and pays(1)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_pays_for_a_tree_s_rows_few_rows_as_measured_never_a_prompt_s(dtype, monkeypatch):
    def x(*shape):
        return torch.randn(*shape, 16, dtype=dtype)
    plan(monkeypatch, False, False, False)
    assert ops.linear_pays(x(ops.LINEAR_MIN_ROWS)) and ops.linear_pays(x(ops.LINEAR_MAX_ROWS))
    assert ops.linear_pays(x(2, ops.LINEAR_MIN_ROWS // 2))  # rows = batch x tokens
    assert not ops.linear_pays(x(1, 1)) and not ops.linear_pays(x(ops.LINEAR_MIN_ROWS - 1))
    plan(monkeypatch, True, False, True)
    assert ops.linear_pays(x(1, 1)) and not ops.linear_pays(x(1, 2)) and ops.linear_pays(x(3, 1))
    plan(monkeypatch, True, True, True, tree_pays=False)
    assert not ops.linear_pays(x(ops.LINEAR_MIN_ROWS)) and ops.linear_pays(x(1))
    plan(monkeypatch, True, False, True)
    assert not ops.linear_pays(x(1, ops.LINEAR_MAX_ROWS + 1)) and not ops.linear_pays(x(0, 1))
    assert not ops.linear_pays(x(ops.LINEAR_MIN_ROWS).half())
    monkeypatch.setattr(ops, "_native_kernels_enabled", False)
    assert not ops.linear_pays(x(ops.LINEAR_MIN_ROWS)) and not ops.linear_pays(x(1))


@native
def test_a_bf16_model_routes_few_rows_and_is_restored(monkeypatch):
    plan(monkeypatch, True, True, True)
    model = tiny_model("llama", dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    few = torch.randn(1, 2, 32, dtype=torch.bfloat16)
    many = torch.randn(1, ops.LINEAR_MAX_ROWS + 1, 32, dtype=torch.bfloat16)  # a prompt's rows
    with routed_linears(model):
        assert torch.equal(layer(few), ops.linear(few, [layer.weight], [layer.bias])[0])
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
    assert "forward" not in vars(layer)
    assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_float_model_routes_a_tree_s_rows_and_keeps_torch_for_one_token_where_measured_so(dtype, monkeypatch):
    plan(monkeypatch, False, False, False)
    model = tiny_model("llama", dtype=dtype)
    layer = model.model.layers[0].mlp.down_proj
    K = layer.in_features
    one, tree = torch.randn(1, 1, K, dtype=dtype), torch.randn(1, ops.LINEAR_MIN_ROWS, K, dtype=dtype)
    with routed_linears(model):
        assert torch.equal(layer(tree), ops.linear(tree, [layer.weight], [layer.bias])[0])
        assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))
    assert not any("forward" in vars(m) for m in model.modules())


@native
def test_int8_weights_follow_float32_s_tuning_and_it_does_not_change_a_bit():
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(2, 200, generator=g), torch.randint(-127, 128, (50, 200), generator=g, dtype=torch.int8)
    scale = torch.rand(50, generator=g)
    try:
        results = []
        for shape in ops.TILE_SHAPES:
            ops._set_tuning(torch.float32, (shape, shape), (shape == "tall", shape != "tall", shape == "tall"))
            results.append([ops.linear_int8(x[:rows], [q], [scale])[0] for rows in (1, 2)])
    finally:
        ops.linear_plan(torch.float32)  # the measured choice again
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert torch.equal(results[0][0][0], results[0][1][0])
