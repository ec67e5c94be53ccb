"""``dsfs bench`` (dsfs/bench.py) and the asv suite that shares its setup (bench/ops.py): the verb runs on rms_norm
on the CPU and on MLX with tiny round counts, its JSON document has every field and ratio, bad input gives one
``dsfs: error:`` line, and the timing loop interleaves. Timings themselves are never asserted (bench/ measures)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsfs import bench, peaks
from dsfs.cli import main
from reference.testing import OpSpec, Output, Sample, get_spec

FAST = ["--warmup", "1", "--repeat", "2", "--min-time", "0"]


@pytest.fixture(scope="module")
def small() -> str:
    """``--shape #i`` of rms_norm's smallest bench shape (fewest bytes)."""
    shapes = bench.describe(get_spec("rms_norm"))
    return f"#{min(shapes, key=lambda d: d['bytes'])['index']}"


def _cli(capsys, *argv):
    rc = main(["bench", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys, *argv) -> dict:
    rc, out, err = _cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)  # stdout holds the document and nothing else


def _rows(doc, **match) -> list[dict]:
    return [r for r in doc["rows"] if all(r[k] == v for k, v in match.items())]


def test_cpu_json_document_and_ratios(capsys, small):
    doc = _json(capsys, "rms_norm", "--device", "cpu", "--shape", small, "--impl", "reference.rms_norm:rms_norm",
                "--impls", "candidate,reference,ours,builtin", "--threads", "1", *FAST)
    assert doc["settings"]["threads"] == 1
    assert doc["op"] == "rms_norm" and doc["device"] == "cpu" and doc["dtype"] == "float32"
    assert doc["device_name"].startswith("CPU") and doc["peak"] is None and doc["modes"] == ["forward"]
    assert set(doc["versions"]) >= {"torch", "triton", "mlx", "python"}
    assert doc["settings"]["repeat"] == 2 and doc["settings"]["candidate"] == "reference.rms_norm:rms_norm"
    by = {r["impl"]: r for r in doc["rows"]}
    assert list(by) == ["candidate", "reference", "ours", "builtin"]
    assert by["ours"]["status"] == "skipped" and "interpreter" in by["ours"]["note"]
    assert by["ours"]["median_ms"] is None and by["ours"]["vs_reference"] is None
    for impl in ("candidate", "reference", "builtin"):
        r = by[impl]
        assert r["status"] == "ok" and r["note"] == "" and r["where"] == "cpu"
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["min_ms"] == min(r["times_ms"])
        assert r["calls_per_sample"] >= 1
        assert r["gb_per_s"] > 0 and r["tflop_per_s"] > 0 and r["gflop"] > 0 and r["gbyte"] > 0
        assert r["pct_peak_bandwidth"] is None and r["pct_peak_flops"] is None
        assert math.isclose(r["vs_reference"], r["median_ms"] / by["reference"]["median_ms"])
        assert math.isclose(r["vs_candidate"], r["median_ms"] / by["candidate"]["median_ms"])
    assert by["reference"]["vs_reference"] == 1.0 and by["candidate"]["vs_candidate"] == 1.0
    assert by["reference"]["target"] == "reference.rms_norm:rms_norm"
    assert by["builtin"]["target"].startswith("builtin[torch]")


def test_cpu_table_both_modes_and_compiled(capsys, small):
    rc, out, err = _cli(capsys, "rms_norm", "--device", "cpu", "--shape", small, "--mode", "both", *FAST)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("rms_norm(x, weight, eps=1e-06) on cpu") and "forward and forward+backward" in lines[0]
    head = next(i for i, line in enumerate(lines) if line.startswith("shape"))
    body = [line for line in lines[head + 2:] if line.startswith("#")]
    assert len(body) == 2 * 3  # forward and backward x reference, compiled, builtin
    for mode in ("forward", "backward"):
        for impl in ("reference", "compiled", "builtin"):
            assert any(f" {mode} " in line and f" {impl} " in line and "failed" not in line for line in body), out
    assert lines[-1].startswith("ours: skipped (")


def test_backward_rows_count_three_forwards(capsys, small):
    doc = _json(capsys, "rms_norm", "--device", "cpu", "--shape", small, "--mode", "both", "--impls", "reference",
                *FAST)
    fwd, bwd = _rows(doc, mode="forward")[0], _rows(doc, mode="backward")[0]
    assert bwd["status"] == "ok" and math.isclose(bwd["gflop"], 3 * fwd["gflop"])


def test_mlx(capsys, small):
    pytest.importorskip("mlx.core")
    doc = _json(capsys, "rms_norm", "--device", "mlx", "--shape", small, "--mode", "both",
                "--impl", "runtime_mlx.kernels.rms_norm:rms_norm", *FAST)
    assert doc["device"] == "mlx" and doc["dtype"] == "bfloat16"
    for mode in ("forward", "backward"):
        by = {r["impl"]: r for r in _rows(doc, mode=mode)}
        assert by["compiled"]["status"] == "skipped" and "torch device" in by["compiled"]["note"]
        assert by["reference"]["status"] == "ok" and by["reference"]["where"] == "cpu"  # torch, same values
        for impl in ("candidate", "ours", "builtin"):
            assert by[impl]["status"] == "ok" and by[impl]["where"] == "mlx", by[impl]
            assert by[impl]["vs_reference"] > 0 and by[impl]["vs_candidate"] > 0
        assert by["ours"]["target"] == "runtime_mlx.kernels.rms_norm:rms_norm"


def test_list(capsys):
    rc, out, _ = _cli(capsys, "--list")
    assert rc == 0
    assert "rms_norm(x, weight, eps=1e-06): forward+backward" in out
    assert "    #0 " in out and "GFLOP" in out and "MB in float32" in out


# ----------------------------------------------------------------------------- bad input


def _error(capsys, *argv, rc: int = 1) -> str:
    got, out, err = _cli(capsys, *argv)
    assert got == rc and err.startswith("dsfs: error: ") and err.count("\n") == 1, err
    assert out == ""
    return err.strip()


WRONG_SHAPE = "def rms_norm(x, weight, eps=1e-6):\n    return x[..., :-1]\n"
RAISES = "def rms_norm(x, weight, eps=1e-6):\n    raise RuntimeError('boom')\n"
TWO_OUTPUTS = "def rms_norm(x, weight, eps=1e-6):\n    return x, x\n"


@pytest.mark.parametrize("argv, msg", [
    (["nope"], "unknown op 'nope'; expected one of rms_norm"),
    ([], "expected an op: dsfs bench OP"),
    (["rms_norm", "--impl", "nocolon"], "expected module:function"),
    (["rms_norm", "--impl", "no_such_module_xyz:f"], "does not import"),
    (["rms_norm", "--impl", "reference.rms_norm:nothing"], "has no function 'nothing'"),
    (["rms_norm", "--impl", "reference.swiglu:swiglu"], "does not take the arguments of rms_norm(x, weight"),
    (["rms_norm", "--shape", "no such shape"], "matches no bench shape"),
    (["rms_norm", "--shape", "#99"], "matches no bench shape"),
    (["rms_norm", "--impls", "reference,bogus"], "--impls bogus: expected a comma-separated subset"),
    (["rms_norm", "--repeat", "0"], "--repeat 0: expected an integer >= 1"),
    (["rms_norm", "--warmup", "0"], "--warmup 0: expected an integer >= 1"),
    (["rms_norm", "--min-time", "-1"], "--min-time -1.0: expected a finite number"),
    (["rms_norm", "--threads", "0"], "--threads 0: expected an integer >= 1"),
])
def test_bad_input(capsys, argv, msg):
    assert msg in _error(capsys, *argv)


def test_bad_choice_is_a_usage_error(capsys):
    assert "invalid choice: 'tpu'" in _error(capsys, "rms_norm", "--device", "tpu", rc=2)


def test_cuda_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "--device cuda: no CUDA device here" in _error(capsys, "rms_norm", "--device", "cuda")


@pytest.mark.parametrize("source, msg", [
    (WRONG_SHAPE, "fails the battery's case 'ragged (2, 5, 100)' (float32, y: shape (2, 5, 99), expected (2, 5, 100))"),
    (RAISES, "(float32, call: RuntimeError: boom)"),
    (TWO_OUTPUTS, "(float32, outputs: returned 2 output(s), expected 1 (y))"),
    ("import torch\n\ndef rms_norm(x, weight, eps=1e-6):\n"
     "    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))\n", "(float32, y: error above the bound)"),
    # ^ ignores the weight: wrong values are not timed either
])
def test_wrong_candidate_is_not_timed(capsys, tmp_path, small, source, msg):
    path = tmp_path / "cand.py"
    path.write_text(source)
    err = _error(capsys, "rms_norm", "--device", "cpu", "--shape", small, "--impl", f"{path}:rms_norm", *FAST)
    assert msg in err and f"dsfs check rms_norm --impl {path}:rms_norm --device cpu" in err


def test_interpreted_triton_is_never_timed(capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    err = _error(capsys, "rms_norm", "--device", "cpu", "--impl", "kernels.triton.rms_norm:rms_norm")
    assert "TRITON_INTERPRET=1 is set" in err


def _toy_spec(differentiable: bool) -> OpSpec:
    def double(x):
        return 2 * x

    def samples(rng):
        return [Sample("toy 4x8", (torch.randn(4, 8, generator=rng),))]

    return OpSpec(name="toy", reference=double, outputs=(Output("y", grad=differentiable),), samples=samples,
                  grads=("x",) if differentiable else (), flops=lambda s, d: float(s.args[0].numel()),
                  bytes=lambda s, d: 2.0 * s.args[0].numel() * d.itemsize)


def test_backward_of_a_forward_only_op(capsys, monkeypatch):
    import reference.testing

    monkeypatch.setattr(reference.testing, "get_spec", lambda name: _toy_spec(False))
    assert "toy is forward only" in _error(capsys, "toy", "--mode", "backward")
    doc = _json(capsys, "toy", "--device", "cpu", "--mode", "both", "--impls", "reference", *FAST)
    assert doc["modes"] == ["forward"] and [r["mode"] for r in doc["rows"]] == ["forward"]


# ----------------------------------------------------------------------------- pieces


def test_percent_of_peak_on_a_known_device(capsys, monkeypatch, small):
    monkeypatch.setattr(bench, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    doc = _json(capsys, "rms_norm", "--device", "cpu", "--shape", small, "--impls", "reference", *FAST)
    assert doc["peak"]["name"] == "H100 SXM"
    r = doc["rows"][0]
    assert math.isclose(r["pct_peak_bandwidth"], 100 * r["gb_per_s"] / 3350)
    assert math.isclose(r["pct_peak_flops"], 100 * r["tflop_per_s"] / 67.0)  # float32: the non-tensor peak


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA A100 80GB PCIe",
                                                                          "A100 80GB PCIe"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("Apple M1", "Apple M1"), ("Apple M1 Pro", "Apple M1 Pro"), ("Apple M2 Max", "Apple M2 Max"),
    ("Apple M4 Max", "Apple M4 Max"), ("CPU Apple M2", None), ("NVIDIA GeForce GTX 1080", None),
])
def test_find_peak(name, peak):
    got = peaks.find_peak(name)
    assert (got.name if got else None) == peak


def test_peaks_are_dense_and_consistent():
    for _, p in peaks.PEAKS:
        assert p.mem > 0
        if p.half is not None and p.fp8 is not None:
            assert p.fp8 == pytest.approx(2 * p.half, rel=0.02)  # FP8 runs at twice the bf16 rate, dense


class _Fake:
    """A `bench.Timed` stand-in that records the order of its calls."""

    def __init__(self, name, log, seconds=0.0):
        self.name, self.log, self.seconds = name, log, seconds

    def run(self):
        self.log.append(self.name)

    def sync(self):
        pass


def test_measure_interleaves_and_rotates():
    log: list[str] = []
    timeds = {n: _Fake(n, log) for n in "abc"}
    times, calls = bench.measure(timeds, warmup=1, repeat=3, min_time=0)
    assert calls == {"a": 1, "b": 1, "c": 1} and all(len(ts) == 3 for ts in times.values())
    assert log == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotated timed rounds


def test_measure_drops_a_failing_implementation():
    class Boom(_Fake):
        def run(self):
            raise RuntimeError("kernel exploded\nsecond line")

    log: list[str] = []
    failed: dict[str, str] = {}
    times, _ = bench.measure({"a": _Fake("a", log), "b": Boom("b", log)}, warmup=1, repeat=2, min_time=0,
                             failed=failed)
    assert list(times) == ["a"] and failed == {"b": "RuntimeError: kernel exploded"}


def test_failed_compile_is_reported_not_raised(monkeypatch):
    spec = get_spec("rms_norm")
    sample = bench.bench_samples(spec)[0]

    def broken(fn, **options):
        def call(*a):
            raise RuntimeError("no C compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(NotImplementedError, match="torch.compile failed: RuntimeError: no C compiler"):
        bench.build(spec, "compiled", sample, torch.float32, "cpu")


def test_build_backward_gives_gradients_of_the_spec_grads():
    spec = get_spec("rms_norm")
    sample = min(bench.bench_samples(spec), key=lambda s: s.args[0].numel())
    cache: dict = {}
    seen = []

    def spy(x, weight, eps=1e-6):
        seen.append((x.requires_grad, weight.requires_grad))
        return spec.reference(x, weight, eps)

    timed = bench.build(spec, "spy", sample, torch.float32, "cpu", "backward", fn=spy, cache=cache)
    timed.call()
    assert seen and all(s == (True, True) for s in seen)
    x, w, _ = cache["cpu"]
    assert x.grad is None and w.grad is None  # reset after each step


# ----------------------------------------------------------------------------- the asv suite


def test_asv_suite_uses_the_same_setup():
    from bench import common, ops

    assert common.forward_backward is bench.forward_backward and common.sync is bench.sync
    names = [d["name"] for d in sorted(bench.describe(get_spec("rms_norm")), key=lambda d: d["bytes"])]
    assert ops.rms_norm.params == [ops.BACKENDS, [d["name"] for d in bench.describe(get_spec("rms_norm"))]]
    fwd, grad = ops.rms_norm(), ops.rms_norm_grad()
    fwd.setup("reference", names[0])
    fwd.time_forward("reference", names[0])
    grad.setup("torch_builtin", names[0])
    grad.time_forward_backward("torch_builtin", names[0])
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="no CUDA device"):
            fwd.setup("cuda", names[0])
    with pytest.raises(NotImplementedError, match="has no bench shape 'nope'"):
        fwd.setup("reference", "nope")
    if bench.unavailable("mlx") is None:
        with pytest.raises(NotImplementedError, match="torch.compile needs a torch device"):
            bench.build(get_spec("rms_norm"), "compiled", bench.bench_samples(get_spec("rms_norm"))[0],
                        torch.float32, "mlx")


@pytest.mark.parametrize("peer", ["transformers", "mlx_lm"])
def test_asv_peers(peer):
    pytest.importorskip(peer)
    from bench import ops

    name = min(bench.describe(get_spec("rms_norm")), key=lambda d: d["bytes"])["name"]
    suite = ops.rms_norm_grad()
    suite.setup(peer, name)
    suite.time_forward_backward(peer, name)


def test_bench_shapes_draw_as_fake_tensors():
    """Every spec's bench samples are drawn without reading values (asv's forkserver must not run torch work)."""
    from reference.testing import all_specs

    for spec in all_specs().values():
        assert bench.describe(spec, counts=False), spec.name


def test_cli_names_agree_with_the_battery():
    from reference.testing import DEVICES, FLOATS

    assert bench.DEVICES == DEVICES
    assert bench.DTYPES == tuple(str(d).removeprefix("torch.") for d in FLOATS)
