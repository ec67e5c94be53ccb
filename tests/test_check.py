"""``dsfs check`` and the public battery (`reference.testing`): every op of the inventory has a spec, deliberately
broken candidates fail with rows that name their case, the fixed candidate and the pytest plugin pass, and bad input
gets one line. Our own kernels run their ops' batteries in tests/cuda and tests/mlx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference.testing import FAMILIES, all_specs, get_spec, run
from tests.test_train import _cli

ROOT = Path(__file__).resolve().parents[1]
BYOK = ROOT / "examples" / "byok"

# DESIGN.md's kernel inventory, op by op (the rows "to build" get their specs with their ops).
INVENTORY = ["rms_norm", "rope", "swiglu", "linear_cross_entropy", "attention", "mla_decode", "indexer_scores",
             "indexer_topk", "sparse_attention", "route", "grouped_gemm", "act_quant", "weight_dequant", "fp8_gemm",
             "fp8_grouped_gemm", "fp8_grouped_wgrad", "preference", "distill", "grpo", "gated_pool", "sink_attention",
             "mhc_pre", "mhc_post", "compressed_topk"]


def _check_json(capsys, *argv) -> tuple[int, dict]:
    rc, out, err = _cli(capsys, "check", *argv, "--json")
    report = json.loads(out)
    assert isinstance(report, list) and len(report) == 1
    return rc, report[0]


def test_every_inventory_op_has_a_spec():
    specs = all_specs()
    assert sorted(specs) == sorted(INVENTORY), "an op of the inventory has no spec (or a spec is not listed)"
    for spec in specs.values():
        samples = spec.samples(spec.rng())
        tags = {t for s in samples for t in s.tags}
        assert "model" in tags and ("ragged" in tags or "edge" in tags), f"{spec.name}: samples lack {tags}"
        assert spec.source and spec.reference.__doc__, f"{spec.name}: no source or reference docstring"
        assert len({s.name for s in samples}) == len(samples), f"{spec.name}: two samples share a name"


def test_list_prints_every_op_with_its_signature(capsys):
    rc, out, _ = _cli(capsys, "check", "--list")
    assert rc == 0
    for spec in all_specs().values():
        assert spec.signature in out


def test_samples_are_seeded():
    for name in ("rms_norm", "route"):
        spec = get_spec(name)
        a, b = spec.samples(spec.rng()), spec.samples(spec.rng())
        for sa, sb in zip(a, b, strict=True):
            for x, y in zip(sa.args, sb.args, strict=True):
                assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), (name, sa.name)


# ---------------------------------------------------------------- broken candidates


def _failing(report: dict) -> list[dict]:
    return [r for r in report["rows"] if not r["passed"]]


def test_rms_norm_accumulating_in_bf16_fails_at_model_width(capsys):
    rc, report = _check_json(capsys, "rms_norm", "--impl", f"{BYOK / 'broken_rms_norm.py'}:rms_norm")
    assert rc == 1
    bad = _failing(report)
    assert {(r["case"], r["dtype"]) for r in bad} >= {("V3 671B hidden", "bfloat16")}
    assert all(r["dtype"] != "float32" for r in bad), "float32 accumulation is fine: only half precision may fail"
    assert any(r["case"].startswith("ragged") and r["dtype"] == "bfloat16" and r["passed"] for r in report["rows"])


def _cases(report: dict, passed: bool) -> set[str]:
    bad = {r["case"] for r in report["rows"] if not r["passed"]}
    return bad if not passed else {r["case"] for r in report["rows"]} - bad


def test_rope_with_the_wrong_pairing_fails_every_interleaved_case(capsys):
    rc, report = _check_json(capsys, "rope", "--impl", f"{BYOK / 'broken_rope.py'}:rope")
    assert rc == 1
    bad, good = _cases(report, False), _cases(report, True)
    assert bad and all(c.endswith(" interleaved") for c in bad)
    assert all(c.endswith(" neox") or c.startswith("no heads") for c in good)
    assert {r["check"] for r in _failing(report)} == {"y", "dx"}


def test_router_admitting_an_expert_of_an_unselected_group_fails_the_grouped_cases(capsys):
    rc, report = _check_json(capsys, "route", "--impl", f"{BYOK / 'broken_route.py'}:route")
    assert rc == 1
    bad, good = _cases(report, False), _cases(report, True)
    assert {c for c in bad if "best expert in an excluded group" in c} == {
        c for c in bad | good if "best expert in an excluded group" in c} != set()
    assert all("groups" not in c or "no groups" in c or "all logits equal" in c for c in good), good
    assert "topk_idx" in {r["check"] for r in _failing(report)}


def test_cross_entropy_writing_its_gradient_into_its_input_fails_inputs_unchanged(capsys):
    rc, report = _check_json(capsys, "linear_cross_entropy", "--impl",
                             f"{BYOK / 'broken_cross_entropy.py'}:linear_cross_entropy")
    assert rc == 1
    bad = _failing(report)
    assert {r["check"] for r in bad} == {"inputs unchanged"} and {r["note"] for r in bad} == {"wrote into hidden"}
    assert _cases(report, False) == {r["case"] for r in report["rows"]}  # every case, the loss itself right


def test_mla_decode_off_by_one_fails_every_decode_step(capsys):
    rc, report = _check_json(capsys, "mla_decode", "--impl", f"{BYOK / 'broken_mla.py'}:mla_decode")
    assert rc == 1
    decode = {r["case"] for r in report["rows"] if "decode step" in r["case"] or "T=1" in r["case"]}
    assert len(decode) >= 4 and decode <= _cases(report, False)


def test_fixed_rms_norm_passes_and_the_table_says_so(capsys):
    rc, out, _ = _cli(capsys, "check", "rms_norm", "--impl", f"{BYOK / 'my_rms_norm.py'}:rms_norm")
    assert rc == 0
    assert "V3 671B hidden" in out and "bfloat16" in out and "FAIL" not in out
    assert "0 failed" in out.splitlines()[-2]


def test_pytest_plugin_example_passes_and_fails_on_the_broken_candidate(tmp_path):
    broken = tmp_path / "test_broken.py"
    broken.write_text("from reference.testing.pytest_plugin import battery\n"
                      f"test_broken = battery('rms_norm', {str(BYOK / 'broken_rms_norm.py') + ':rms_norm'!r}, "
                      "tags=['model'])\n")
    ok = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         str(BYOK / "test_my_rms_norm.py"), str(broken)], cwd=ROOT, capture_output=True, text=True)
    tail = ok.stdout.strip().splitlines()[-1]
    spec = get_spec("rms_norm")
    n_cases, n_model = len(spec.cases()), sum("model" in s.tags for s, _ in spec.cases())
    assert f"1 failed, {n_cases + n_model - 1} passed" in tail, ok.stdout[-3000:]
    assert "test_broken[V3 671B hidden-bfloat16]" in ok.stdout and "error above the bound" in ok.stdout


# ---------------------------------------------------------------- bad input


def _write(tmp_path: Path, body: str) -> str:
    path = tmp_path / "cand.py"
    path.write_text("import torch\n\n" + body)
    return f"{path}:rms_norm"


def _error(capsys, *argv) -> str:
    rc, _, err = _cli(capsys, "check", *argv)
    assert rc == 1 and err.startswith("dsfs: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("impl, msg", [
    ("no_such_module_xyz:f", "module no_such_module_xyz does not import (ModuleNotFoundError"),
    ("reference.rms_norm:nope", "module reference.rms_norm has no function 'nope' (it has:"),
    ("reference.rms_norm", "expected module:function"),
    ("reference.rope:apply_rope", "does not take the arguments of rms_norm(x, weight, eps=1e-06)"),
    ("missing/file.py:f", "no such file missing/file.py"),
])
def test_bad_impl_gets_one_line(capsys, impl, msg):
    assert msg in _error(capsys, "rms_norm", "--impl", impl)


def test_module_raising_on_import_gets_one_line(capsys, tmp_path):
    (tmp_path / "boom.py").write_text("raise RuntimeError('needs a GPU')\n")
    assert "does not import (RuntimeError: needs a GPU)" in _error(capsys, "rms_norm", "--impl",
                                                                   f"{tmp_path / 'boom.py'}:f")


@pytest.mark.parametrize("argv, msg", [
    (["rmsnorm"], "unknown op 'rmsnorm'; expected one of rms_norm,"),
    ([], "expected an op"),
    (["all", "--impl", "reference.rms_norm:rms_norm"], "--impl needs one op"),
    (["rms_norm", "--device", "cuda"] if not torch.cuda.is_available() else ["rms_norm", "--device", "mps"],
     "no CUDA device here" if not torch.cuda.is_available() else "no MPS device"),
    (["rope", "--device", "mlx"], "rope: no implementation of ours for --device mlx"),
])
def test_bad_command_gets_one_line(capsys, argv, msg):
    assert msg in _error(capsys, *argv)


@pytest.mark.parametrize("body, note", [
    ("def rms_norm(x, weight, eps=1e-6):\n    return x.sum(-1)\n", "shape (2, 5), expected (2, 5, 100)"),
    ("def rms_norm(x, weight, eps=1e-6):\n    return torch.nn.functional.rms_norm(x.double(), (x.shape[-1],), "
     "weight.double(), eps)\n", "dtype float64, expected float32"),
    ("def rms_norm(x, weight, eps=1e-6):\n    return x.detach().numpy()\n", "returned ndarray"),
    ("def rms_norm(x, weight, eps=1e-6):\n    raise NotImplementedError('bf16 later')\n",
     "NotImplementedError: bf16 later"),
])
def test_wrong_outputs_fail_with_rows_naming_what_was_expected(capsys, tmp_path, body, note):
    rc, report = _check_json(capsys, "rms_norm", "--impl", _write(tmp_path, body), "--dtype", "float32")
    assert rc == 1
    first = _failing(report)[0]
    assert first["case"] == "ragged (2, 5, 100)" and note in first["note"], first


def test_candidate_writing_into_its_input_fails(tmp_path):
    path = tmp_path / "inplace.py"
    path.write_text("import torch\n\ndef rms_norm(x, weight, eps=1e-6):\n"
                    "    return x.mul_(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).mul_(weight)\n")
    from reference.testing import load_impl

    rows = run(get_spec("rms_norm"), load_impl(f"{path}:rms_norm"), "cpu", [torch.float32], ["ragged"],
               backward=False)
    assert {r.check for r in rows if not r.passed} == {"inputs unchanged"}
    assert all(r.note == "wrote into x" for r in rows if not r.passed)


def test_out_buffer_is_poisoned(tmp_path):
    """A candidate taking out= gets a NaN-filled buffer: one that leaves the last column unwritten fails."""
    path = tmp_path / "outbuf.py"
    path.write_text("import torch\nfrom reference.rms_norm import rms_norm as ref\n\n"
                    "def rms_norm(x, weight, eps=1e-6, out=None):\n"
                    "    out[..., :-1] = ref(x, weight, eps)[..., :-1]\n    return out\n")
    from reference.testing import load_impl

    rows = run(get_spec("rms_norm"), load_impl(f"{path}:rms_norm"), "cpu", [torch.float32], ["ragged"],
               backward=False)
    assert [r.note for r in rows if r.check == "y"] == ["NaN or Inf in the output"] * 3


def test_families_cover_the_spec_modules():
    mods = {p.stem for p in (ROOT / "reference" / "testing").glob("*.py")}
    assert set(FAMILIES) <= mods


@pytest.mark.parametrize("body, check, note", [
    ("def rms_norm(x, weight, eps=1e-6):\n    raise SystemExit(0)\n", "call", "SystemExit: 0"),
    ("def rms_norm(x, weight, eps=1e-6):\n    return torch.empty(x.shape, device='meta')\n", "y",
     "on device meta, expected cpu"),
    ("from reference.rms_norm import rms_norm as ref\n\ndef rms_norm(x, weight, eps=1e-6):\n"
     "    return ref(x, weight, eps).detach()\n", "backward", "no output carries an autograd graph"),
])
def test_candidates_that_escape_the_checks_fail_a_row(capsys, tmp_path, body, check, note):
    """(issue 20 review) a candidate calling sys.exit, an output on another device, a detached output."""
    rc, report = _check_json(capsys, "rms_norm", "--impl", _write(tmp_path, body), "--dtype", "float32",
                             "--cases", "ragged")
    assert rc == 1
    first = _failing(report)[0]
    assert first["check"] == check and note in first["note"], first


def test_out_kernel_gets_gradients_without_its_buffer(tmp_path):
    path = tmp_path / "outgrad.py"
    path.write_text("from reference.rms_norm import rms_norm as ref\n\n"
                    "def rms_norm(x, weight, eps=1e-6, out=None):\n"
                    "    y = ref(x, weight, eps)\n    return y if out is None else out.copy_(y)\n")
    from reference.testing import failures, load_impl

    rows = run(get_spec("rms_norm"), load_impl(f"{path}:rms_norm"), "cpu", [torch.float32], ["ragged"])
    assert not failures(rows) and any(r.check == "dx" for r in rows)


def test_file_candidates_import_their_neighbours_and_shadow_nothing(capsys, tmp_path):
    (tmp_path / "helpers.py").write_text("from reference.rms_norm import rms_norm\n")
    (tmp_path / "runtime_mlx.py").write_text("from helpers import rms_norm\n")
    rc, report = _check_json(capsys, "rms_norm", "--impl", f"{tmp_path / 'runtime_mlx.py'}:rms_norm",
                             "--dtype", "float32", "--cases", "ragged")
    assert rc == 0 and report["failed"] == 0
    import runtime_mlx.kernels  # the package, not the candidate file of the same name

    assert hasattr(runtime_mlx.kernels, "rms_norm")


def test_empty_selection_and_empty_impl_are_errors(capsys):
    assert "no sample has the tag(s) decode" in _error(capsys, "weight_dequant", "--cases", "decode")
    assert "--impl is empty" in _error(capsys, "rms_norm", "--impl", "")
    from reference.testing.pytest_plugin import cases

    with pytest.raises(ValueError, match="route: no case"):
        cases("route", dtypes=[torch.bfloat16])


def test_check_all_skips_ops_without_a_selected_case(capsys):
    pytest.importorskip("mlx")
    rc, out, err = _cli(capsys, "check", "all", "--device", "mlx", "--cases", "decode", "--dtype", "bfloat16",
                        "--failures-only")
    assert rc == 0 and "indexer_topk: skipped, no case with these dtypes and tags" in err
    assert out.strip().splitlines()[-1].endswith("checks, 0 failed")
