"""Tests of build.py: they run the real nvcc on tiny kernels (sm_75, at most two archs).

No GPU is needed: nvcc only compiles. Where nvcc is missing the compiling tests skip,
except under CI=true, where they fail (CI has nvcc; a skip there would hide a broken setup).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_PY = ROOT / "build.py"

# Load build.py by path: "import build" could find PyPA's `build` package instead.
_spec = importlib.util.spec_from_file_location("akv_build", BUILD_PY)
akv_build = importlib.util.module_from_spec(_spec)
sys.modules["akv_build"] = akv_build  # dataclasses need the module registered
_spec.loader.exec_module(akv_build)

HEADER = """\
#pragma once
__device__ inline float twice(float x) { return 2.0f * x; }
"""

KERNEL = """\
#include "common.cuh"
extern "C" __global__ void scale_add(float* a, const float* b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += twice(b[i]);
}
"""

BAD_KERNEL = """\
extern "C" __global__ void broken(float* a) {
    undefined_thing(a);
}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="session")
def nvcc() -> str:
    try:
        return akv_build.find_nvcc()
    except akv_build.NvccNotFound as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI has no nvcc: {e}")
        pytest.skip(f"nvcc not found: {e}")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "common.cuh").write_text(HEADER)
    (d / "k.cu").write_text(KERNEL)
    return d


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def do_build(src: Path, out: Path, archs=("sm_75",), **kw):
    return akv_build.run_build(archs=list(archs), out_dir=out, src_dir=src, jobs=2, log=quiet, **kw)


def statuses(report) -> dict[tuple[str, str], str]:
    return {(r.arch, r.source): r.status for r in report.results}


# ------------------------------------------------------------------ building and the manifest


def test_build_writes_one_cubin_per_arch_and_the_manifest(nvcc, src, out):
    report = do_build(src, out, archs=("sm_75", "sm_80"))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == report.manifest
    assert set(manifest) == {"nvcc_version", "flags", "sources", "architectures", "built_at"}
    assert manifest["nvcc_version"] == akv_build.nvcc_version(nvcc)
    assert "release" in manifest["nvcc_version"]
    assert manifest["flags"] == ["-cubin", "-O3", "-lineinfo", "-std=c++17", "-I", str(src.resolve())]
    assert manifest["sources"] == {"k.cu": sha256(src / "k.cu"), "common.cuh": sha256(src / "common.cuh")}
    assert dt.datetime.fromisoformat(manifest["built_at"]).tzinfo is not None

    assert set(manifest["architectures"]) == {"sm_75", "sm_80"}
    for arch in ("sm_75", "sm_80"):
        cubin = out / arch / "k.cubin"
        assert cubin.read_bytes()[:4] == b"\x7fELF"
        assert manifest["architectures"][arch] == {"k.cubin": {"sha256": sha256(cubin), "source": "k.cu"}}
    # nothing else was left in the output folders (no temporary files)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["k.cubin", "k.cubin", "manifest.json"]
    assert set(statuses(report).values()) == {"built"}


def test_second_build_is_a_noop(nvcc, src, out):
    do_build(src, out)
    cubin = out / "sm_75" / "k.cubin"
    before = cubin.stat().st_mtime_ns, sha256(cubin)

    report = do_build(src, out)
    assert statuses(report) == {("sm_75", "k.cu"): "up to date"}
    assert (cubin.stat().st_mtime_ns, sha256(cubin)) == before

    # Staleness is by content: touching the source without changing it rebuilds nothing.
    os.utime(src / "k.cu", ns=(before[0] + 10**10, before[0] + 10**10))
    assert statuses(do_build(src, out)) == {("sm_75", "k.cu"): "up to date"}


def test_changed_source_header_or_force_rebuilds(nvcc, src, out):
    do_build(src, out)

    (src / "k.cu").write_text(KERNEL + "// changed\n")
    report = do_build(src, out)
    assert statuses(report) == {("sm_75", "k.cu"): "built"}
    assert report.manifest["sources"]["k.cu"] == sha256(src / "k.cu")

    (src / "common.cuh").write_text(HEADER + "// changed\n")
    assert statuses(do_build(src, out)) == {("sm_75", "k.cu"): "built"}

    assert statuses(do_build(src, out, force=True)) == {("sm_75", "k.cu"): "built"}
    assert statuses(do_build(src, out)) == {("sm_75", "k.cu"): "up to date"}


def test_force_from_the_command_line(nvcc, src, out, capsys):
    argv = ["--arch", "sm_75", "--src", str(src), "--out", str(out), "-j", "1"]
    assert akv_build.main(argv) == 0
    assert akv_build.main(argv) == 0
    assert "0 built, 1 up to date" in capsys.readouterr().out
    assert akv_build.main(argv + ["--force"]) == 0
    text = capsys.readouterr().out
    assert "1 built, 0 up to date" in text
    assert f"manifest: {out.resolve() / 'manifest.json'}" in text


def test_missing_or_tampered_cubin_is_rebuilt(nvcc, src, out):
    do_build(src, out)
    cubin = out / "sm_75" / "k.cubin"

    cubin.unlink()
    assert statuses(do_build(src, out)) == {("sm_75", "k.cu"): "built"}

    cubin.write_bytes(b"not a cubin")
    report = do_build(src, out)
    assert statuses(report) == {("sm_75", "k.cu"): "built"}
    assert report.manifest["architectures"]["sm_75"]["k.cubin"]["sha256"] == sha256(cubin)


def test_unreadable_manifest_rebuilds_everything(nvcc, src, out):
    do_build(src, out)
    (out / "manifest.json").write_text("{ not json")
    report = do_build(src, out)
    assert statuses(report) == {("sm_75", "k.cu"): "built"}
    assert json.loads((out / "manifest.json").read_text()) == report.manifest


def test_changed_flags_rebuild(nvcc, src, out, monkeypatch):
    do_build(src, out)
    monkeypatch.setenv("NVCC_APPEND_FLAGS", "-DAKV_TEST_FLAG=1")
    report = do_build(src, out)
    assert statuses(report) == {("sm_75", "k.cu"): "built"}
    assert "NVCC_APPEND_FLAGS=-DAKV_TEST_FLAG=1" in report.manifest["flags"]
    assert statuses(do_build(src, out)) == {("sm_75", "k.cu"): "up to date"}


def test_other_archs_kept_while_fresh_and_dropped_once_stale(nvcc, src, out):
    do_build(src, out, archs=("sm_75", "sm_80"))

    # Building only sm_75 keeps sm_80's still valid entry.
    report = do_build(src, out, archs=("sm_75",))
    assert set(report.manifest["architectures"]) == {"sm_75", "sm_80"}

    # After a source change, sm_80's cubin is stale: it leaves the manifest.
    (src / "k.cu").write_text(KERNEL + "// changed\n")
    report = do_build(src, out, archs=("sm_75",))
    assert set(report.manifest["architectures"]) == {"sm_75"}
    assert report.dropped == ["sm_80/k.cubin"]


# ------------------------------------------------------------------ failures


def test_compile_error_exits_nonzero_with_nvccs_message(nvcc, src, out, capsys):
    (src / "bad.cu").write_text(BAD_KERNEL)
    rc = akv_build.main(["--arch", "sm_75", "--src", str(src), "--out", str(out)])
    assert rc != 0
    captured = capsys.readouterr()
    err = captured.err
    assert 'identifier "undefined_thing" is undefined' in err  # nvcc's own text
    assert "bad.cu" in err and "sm_75" in err
    assert "FAILED" in captured.out

    # The good file still built and is in the manifest; the failed one is not, nor on disk.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architectures"] == {
        "sm_75": {"k.cubin": {"sha256": sha256(out / "sm_75" / "k.cubin"), "source": "k.cu"}}
    }
    assert not (out / "sm_75" / "bad.cubin").exists()


def test_compile_error_from_the_api(nvcc, src, out):
    (src / "bad.cu").write_text(BAD_KERNEL)
    with pytest.raises(akv_build.CompileError) as info:
        do_build(src, out)
    assert [(r.arch, r.source) for r in info.value.failures] == [("sm_75", "bad.cu")]
    assert "undefined_thing" in info.value.details()


def test_missing_nvcc_exits_2_with_advice(src, out):
    proc = subprocess.run(
        [sys.executable, str(BUILD_PY), "--nvcc", "/nonexistent", "--src", str(src), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "nvcc not found" in proc.stderr
    assert "/nonexistent" in proc.stderr
    assert "CUDA Toolkit" in proc.stderr and "--nvcc" in proc.stderr and "NVCC=" in proc.stderr
    assert not out.exists()


def test_nvcc_env_var_is_used(src, out, monkeypatch, capsys):
    monkeypatch.setenv("NVCC", "/nonexistent/bin/nvcc")
    assert akv_build.main(["--src", str(src), "--out", str(out)]) == 2
    assert "/nonexistent/bin/nvcc ($NVCC)" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["sm90", "sm_9", "compute_90", "90", "sm_90x", "SM_90"])
def test_bad_arch_is_rejected(bad, src, out, capsys):
    with pytest.raises(SystemExit) as info:
        akv_build.main(["--arch", bad, "--src", str(src), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid architecture {bad!r}" in err
    assert "sm_NN" in err
    assert not out.exists()


def test_arch_nvcc_cannot_target_is_rejected(nvcc, src, out, capsys):
    assert akv_build.main(["--arch", "sm_50", "--src", str(src), "--out", str(out)]) == 2
    assert "cannot target sm_50" in capsys.readouterr().err


def test_no_cu_files_is_an_error(nvcc, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert akv_build.main(["--src", str(empty), "--out", str(tmp_path / "out")]) == 2
    assert "no .cu files" in capsys.readouterr().err


def test_parse_archs():
    assert akv_build.parse_archs(None) == list(akv_build.DEFAULT_ARCHS)
    assert akv_build.parse_archs(["sm_80,sm_90", "sm_90a", "sm_80"]) == ["sm_80", "sm_90", "sm_90a"]
    assert akv_build.parse_archs("sm_120") == ["sm_120"]
    assert akv_build.DEFAULT_ARCHS == ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")


# ------------------------------------------------------------------ --verbose


def test_verbose_prints_ptxas_resource_usage(nvcc, src, out, capsys):
    assert akv_build.main(["--verbose", "--arch", "sm_75", "--src", str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "scale_add" in ln)
    assert "Used" in line and "registers" in line
    assert "spill stores" in line and "stack frame" in line


PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mul' for 'sm_75'
ptxas info    : Function properties for mul
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 512 bytes smem, 364 bytes cmem[0]
ptxas info    : Compile time = 17.381 ms
ptxas info    : Compiling entry function 'add' for 'sm_75'
ptxas info    : Function properties for add
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 372 bytes cmem[0]
"""


def test_parse_ptxas():
    mul, add = akv_build.parse_ptxas(PTXAS_SAMPLE)
    assert (mul.name, mul.registers, mul.barriers, mul.smem) == ("mul", 40, 1, 512)
    assert (mul.stack, mul.spill_stores, mul.spill_loads) == (16, 8, 4)
    assert (add.name, add.registers, add.smem, add.spill_stores) == ("add", 10, 0, 0)
    assert "Used 40 registers" in mul.line() and "8 bytes spill stores" in mul.line()


# ------------------------------------------------------------------ the project's own kernels


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "cuda" / "akv.cu").exists(), reason="cuda/akv.cu is not written yet")
def test_project_sources_build_for_sm_90(nvcc, tmp_path):
    out = tmp_path / "cubin"
    proc = subprocess.run(
        [sys.executable, str(BUILD_PY), "--arch", "sm_90", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    flags = manifest["flags"]
    assert flags[flags.index("-I") + 1] == "cuda"  # relative to the repo root, where nvcc runs
    entries = manifest["architectures"]["sm_90"]
    assert "akv.cubin" in entries
    for name, info in entries.items():
        assert info["sha256"] == sha256(out / "sm_90" / name)
    assert set(info["source"] for info in entries.values()) == {p.name for p in (ROOT / "cuda").glob("*.cu")}
