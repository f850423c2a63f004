#!/usr/bin/env python3
"""Compile the CUDA kernels in ``cuda/*.cu`` into one ``.cubin`` per GPU architecture.

Usage::

    python build.py                      # all default architectures, all cuda/*.cu
    python build.py --arch sm_90         # only Hopper (repeatable, or sm_80,sm_90)
    python build.py --verbose            # also print ptxas's registers/spills/smem per kernel
    python build.py --force -j 4         # rebuild everything, 4 nvcc processes at once

Outputs ``<out>/<arch>/<stem>.cubin`` (``<out>`` defaults to ``build/cubin``) and
``<out>/manifest.json``, which the runtime reads to find the cubins::

    {
      "nvcc_version": "Cuda compilation tools, release 13.0, V13.0.88; Build ...",
      "flags": ["-cubin", "-O3", "-lineinfo", "-std=c++17", "-I", "cuda"],
      "sources": {"akv.cu": "<sha256>", "common.cuh": "<sha256>"},
      "architectures": {"sm_90": {"akv.cubin": {"sha256": "<sha256>", "source": "akv.cu"}}},
      "built_at": "2026-11-29T08:30:00+00:00"
    }

Invariant: every cubin listed under ``architectures`` was compiled from exactly the
``sources`` (each ``.cu`` and all ``*.cuh`` headers), by ``nvcc_version``, with
``flags``. An output is rebuilt when it is missing, when its bytes no longer match the
recorded sha256, or when its ``.cu``, any header, the nvcc version or the flags changed.
Entries of architectures that were not asked for this time are kept when still up to
date and dropped from the manifest otherwise (their stale files are left on disk).

Only the standard library is used. Exit codes: 0 success, 1 compile error,
2 usage error / nvcc not found / nothing to build.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent
DEFAULT_SRC = ROOT / "cuda"
DEFAULT_OUT = ROOT / "build" / "cubin"
MANIFEST_NAME = "manifest.json"
#: CUDA 13 dropped everything below Turing; sm_75 is its minimum.
DEFAULT_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
#: Flags that shape the cubin (besides -arch and the include dir, which is added per build).
BASE_FLAGS = ("-cubin", "-O3", "-lineinfo", "-std=c++17")
#: Environment variables nvcc reads that change what it compiles; recorded in the flags.
NVCC_ENV_FLAGS = ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS")
HEADER_GLOB = "*.cuh"
ARCH_RE = re.compile(r"^sm_(\d{2,3})([af]?)$")

INSTALL_HINT = (
    "Install the CUDA Toolkit 13.x, which provides nvcc (https://developer.nvidia.com/cuda-downloads;\n"
    "on Debian/Ubuntu NVIDIA's apt repository package 'cuda-nvcc-13-0'), then either put nvcc on\n"
    "PATH, set NVCC=/path/to/nvcc, or pass --nvcc /path/to/nvcc."
)


# --------------------------------------------------------------------------- errors


class BuildError(Exception):
    """A failure the CLI reports as ``build.py: error: <message>`` with :attr:`exit_code`."""

    exit_code = 1


class UsageError(BuildError):
    """Bad arguments: an architecture nvcc can't target, no sources, bad -j."""

    exit_code = 2


class NvccNotFound(BuildError):
    exit_code = 2


class CompileError(BuildError):
    """One or more nvcc invocations failed; the manifest was still written for the others."""

    exit_code = 1

    def __init__(self, failures: list["Result"], report: "BuildReport"):
        self.failures = failures
        self.report = report
        names = ", ".join(f"{r.arch}/{r.source}" for r in failures)
        super().__init__(f"{len(failures)} compile(s) failed: {names}")

    def details(self) -> str:
        """Each failure's arch, file, command and nvcc's own stderr."""
        return "\n\n".join(r.failure_text() for r in self.failures)


# --------------------------------------------------------------------------- helpers


def _print(msg: str) -> None:
    print(msg, flush=True)  # progress shows up at once in CI logs too


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_archs(values: Iterable[str] | str | None) -> list[str]:
    """``["sm_80,sm_90", "sm_90a"]`` -> ``["sm_80", "sm_90", "sm_90a"]`` (validated, deduplicated).

    ``None`` or empty gives :data:`DEFAULT_ARCHS`. Raises :class:`UsageError` on a value
    that isn't of the form ``sm_NN`` / ``sm_NNa`` (``sm_NNN``/``sm_NNNf`` for newer chips).
    """
    if values is None:
        return list(DEFAULT_ARCHS)
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in str(value).split(","):
            arch = part.strip()
            if not arch:
                continue
            if not ARCH_RE.match(arch):
                raise UsageError(
                    f"invalid architecture {arch!r}: expected sm_NN or sm_NNa "
                    f"(e.g. sm_90, sm_90a, sm_120; CUDA 13's minimum is sm_75)"
                )
            if arch not in out:
                out.append(arch)
    if not out:
        return list(DEFAULT_ARCHS)
    return out


def find_nvcc(explicit: str | os.PathLike | None = None) -> str:
    """The nvcc to use: ``explicit`` (``--nvcc``), else ``$NVCC``, else ``nvcc`` on PATH,
    else ``/usr/local/cuda/bin/nvcc``. Raises :class:`NvccNotFound` with install advice."""
    if explicit:
        candidates = [("--nvcc", str(explicit))]
    elif os.environ.get("NVCC"):
        candidates = [("$NVCC", os.environ["NVCC"])]
    else:
        candidates = [("PATH", "nvcc"), ("default", "/usr/local/cuda/bin/nvcc")]
    tried = []
    for origin, cand in candidates:
        resolved = shutil.which(cand)
        if resolved:
            return resolved
        tried.append(f"{cand} ({origin})")
    raise NvccNotFound(f"nvcc not found; tried: {', '.join(tried)}.\n{INSTALL_HINT}")


def nvcc_version(nvcc: str) -> str:
    """A one-line identity of the compiler, from ``nvcc --version``."""
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise NvccNotFound(f"cannot run {nvcc}: {e}\n{INSTALL_HINT}") from e
    except subprocess.TimeoutExpired as e:
        raise NvccNotFound(f"{nvcc} --version did not answer within 120 s") from e
    if proc.returncode != 0:
        raise NvccNotFound(
            f"{nvcc} --version failed (exit {proc.returncode}):\n{proc.stderr.strip()}\n{INSTALL_HINT}"
        )
    lines = [ln.strip() for ln in proc.stdout.splitlines()]
    keep = [ln for ln in lines if ln.startswith(("Cuda compilation tools", "Build "))]
    return "; ".join(keep) if keep else " ".join(ln for ln in lines if ln)


def supported_archs(nvcc: str) -> list[str] | None:
    """``nvcc --list-gpu-code``'s sm_* entries, or None where this nvcc can't list them."""
    try:
        proc = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    codes = [ln.strip() for ln in proc.stdout.split()]
    sms = [c for c in codes if c.startswith("sm_")]
    return sms or None


def check_archs_supported(archs: Sequence[str], nvcc: str) -> None:
    supported = supported_archs(nvcc)
    if supported is None:
        return  # let nvcc itself complain
    bad = [a for a in archs if ARCH_RE.sub(r"sm_\1", a) not in supported]
    if bad:
        raise UsageError(
            f"this nvcc cannot target {', '.join(bad)}; it supports: {' '.join(supported)} "
            f"(plus the 'a'/'f' variants of the newer ones)"
        )


def _display_path(p: Path) -> str:
    """``p`` relative to the repo root when inside it (what nvcc's messages will show)."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p.resolve())


def compile_flags(src_dir: Path) -> list[str]:
    """The flags recorded in the manifest: everything but ``-arch``, ``-o`` and ``-Xptxas -v``."""
    flags = list(BASE_FLAGS) + ["-I", _display_path(src_dir)]
    for var in NVCC_ENV_FLAGS:
        if os.environ.get(var):
            flags.append(f"{var}={os.environ[var]}")
    return flags


def load_manifest(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        print(f"build.py: warning: ignoring unreadable {path}: {e}", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(path: Path, manifest: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- ptxas -v


@dataclass
class KernelUsage:
    name: str
    registers: int | None = None
    barriers: int | None = None
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    cmem: str = ""
    used_text: str = ""  # ptxas's own words: "Used 10 registers, used 0 barriers, 372 bytes cmem[0]"
    frame_text: str = ""  # "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"

    def line(self) -> str:
        """ptxas's two lines about this kernel, joined: registers/barriers/smem; stack/spills."""
        used = self.used_text or "Used ? registers"
        return f"{self.name}: {used}; {self.frame_text or 'no frame info'}"


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_PROPS = re.compile(r"Function properties for (\S+)")
_RE_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_BAR = re.compile(r"used (\d+) barriers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")
_RE_CMEM = re.compile(r"(\d+ bytes cmem\[\d+\](?:, \d+ bytes cmem\[\d+\])*)")


def parse_ptxas(stderr: str) -> list[KernelUsage]:
    """Per-kernel resource usage from nvcc ``-Xptxas -v`` output (entry functions only)."""
    kernels: dict[str, KernelUsage] = {}
    current: str | None = None  # the entry being compiled ('Used N registers' belongs to it)
    props: str | None = None  # the function whose 'Function properties' block we are in
    for line in stderr.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, KernelUsage(current))
            continue
        m = _RE_PROPS.search(line)
        if m:
            props = m.group(1)
            continue
        m = _RE_STACK.search(line)
        if m and props in kernels:
            k = kernels[props]
            k.stack, k.spill_stores, k.spill_loads = (int(x) for x in m.groups())
            k.frame_text = m.group(0)
            continue
        m = _RE_USED.search(line)
        if m and current is not None:
            k = kernels[current]
            k.registers = int(m.group(1))
            k.used_text = line[m.start():].strip()
            if (b := _RE_BAR.search(line)):
                k.barriers = int(b.group(1))
            if (s := _RE_SMEM.search(line)):
                k.smem = int(s.group(1))
            if (c := _RE_CMEM.search(line)):
                k.cmem = c.group(1)
    return list(kernels.values())


def _warning_lines(stderr: str) -> list[str]:
    """nvcc stderr minus the ``ptxas info`` chatter (what is worth showing on success)."""
    out = []
    for ln in stderr.splitlines():
        s = ln.strip()
        if not s or s.startswith("ptxas info"):
            continue
        if _RE_STACK.search(s) or _RE_USED.search(s):
            continue  # continuation lines of ptxas info blocks
        out.append(ln)
    return out


# --------------------------------------------------------------------------- the build


@dataclass
class Result:
    arch: str
    source: str  # file name of the .cu, e.g. "akv.cu"
    cubin: str  # file name of the output, e.g. "akv.cubin"
    status: str  # "built", "up to date" or "FAILED"
    seconds: float = 0.0
    returncode: int = 0
    stderr: str = ""
    command: list[str] = field(default_factory=list)
    kernels: list[KernelUsage] = field(default_factory=list)

    def failure_text(self) -> str:
        cmd = " ".join(self.command)
        return (
            f"nvcc failed for {self.source} on {self.arch} (exit {self.returncode})\n"
            f"  command: {cmd}\n"
            f"{self.stderr.rstrip()}"
        )


@dataclass
class BuildReport:
    manifest: dict
    manifest_path: Path
    results: list[Result]
    archs: list[str]
    sources: list[str]
    dropped: list[str] = field(default_factory=list)

    def status(self, arch: str, source: str) -> str:
        for r in self.results:
            if r.arch == arch and r.source == source:
                return r.status
        raise KeyError((arch, source))

    @property
    def built(self) -> list[Result]:
        return [r for r in self.results if r.status == "built"]

    def summary(self) -> str:
        """A table: one row per arch, one column per source file."""
        width0 = max(len("arch"), *(len(a) for a in self.archs))
        widths = [max(len(s), len("up to date"), len("FAILED")) for s in self.sources]
        rows = ["  ".join(["arch".ljust(width0)] + [s.ljust(w) for s, w in zip(self.sources, widths)])]
        for arch in self.archs:
            cells = [self.status(arch, s).ljust(w) for s, w in zip(self.sources, widths)]
            rows.append("  ".join([arch.ljust(width0)] + cells))
        n_built = len(self.built)
        n_ok = sum(r.status == "up to date" for r in self.results)
        n_fail = sum(r.status == "FAILED" for r in self.results)
        rows.append(f"{n_built} built, {n_ok} up to date, {n_fail} failed")
        return "\n".join(r.rstrip() for r in rows)


def _is_up_to_date(prev: dict, arch: str, cu: str, cubin_path: Path, cur: dict) -> bool:
    """Whether ``prev`` (the old manifest) vouches for ``cubin_path`` under the current inputs."""
    if not cubin_path.is_file():
        return False
    if prev.get("nvcc_version") != cur["nvcc_version"] or prev.get("flags") != cur["flags"]:
        return False
    prev_sources = prev.get("sources") or {}
    cur_sources = cur["sources"]
    if prev_sources.get(cu) != cur_sources.get(cu):
        return False
    headers = {k: v for k, v in cur_sources.items() if k.endswith(".cuh")}
    prev_headers = {k: v for k, v in prev_sources.items() if k.endswith(".cuh")}
    if headers != prev_headers:
        return False
    entry = ((prev.get("architectures") or {}).get(arch) or {}).get(cubin_path.name)
    if not isinstance(entry, dict) or entry.get("source") != cu:
        return False
    return entry.get("sha256") == sha256_file(cubin_path)


def _compile_one(nvcc: str, arch: str, src: Path, out: Path, flags: list[str], verbose: bool) -> Result:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    # The recorded flags may end in NVCC_*_FLAGS=... notes: nvcc reads those from the environment.
    env_notes = tuple(f"{var}=" for var in NVCC_ENV_FLAGS)
    cmd = [nvcc] + [f for f in flags if not f.startswith(env_notes)] + [f"-arch={arch}"]
    if verbose:
        cmd += ["-Xptxas", "-v"]
    cmd += [_display_path(src), "-o", str(tmp)]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=ROOT)
        rc, stderr = proc.returncode, proc.stderr + proc.stdout
    except OSError as e:
        rc, stderr = 127, f"cannot run {nvcc}: {e}"
    dt = time.monotonic() - t0
    res = Result(arch, src.name, out.name, "built" if rc == 0 else "FAILED", dt, rc, stderr, cmd)
    if rc == 0 and not tmp.is_file():
        res.status, res.returncode = "FAILED", rc or 1
        res.stderr += f"\nnvcc exited 0 but wrote no {tmp}"
    if res.status == "built":
        os.replace(tmp, out)
        if verbose:
            res.kernels = parse_ptxas(stderr)
    else:
        for p in (tmp, out):  # leave no cubin that the manifest does not vouch for
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return res


def run_build(
    archs: Iterable[str] | str | None = None,
    out_dir: str | os.PathLike | None = None,
    jobs: int | None = None,
    force: bool = False,
    verbose: bool = False,
    nvcc: str | os.PathLike | None = None,
    src_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build what is stale and write the manifest; returns what was done.

    Progress goes to ``log`` (default: print to stdout; pass ``lambda msg: None`` to silence).

    Raises :class:`NvccNotFound` (no compiler), :class:`UsageError` (bad arch, no ``.cu``,
    bad jobs) or :class:`CompileError` (after writing the manifest for what did build).
    """
    say = log if log is not None else _print
    arch_list = parse_archs(archs)
    # Absolute paths: nvcc runs in the repo root (so its messages say cuda/akv.cu).
    src = Path(src_dir).resolve() if src_dir is not None else DEFAULT_SRC
    out_root = Path(out_dir).resolve() if out_dir is not None else DEFAULT_OUT
    if jobs is None:
        jobs = os.cpu_count() or 1
    if jobs < 1:
        raise UsageError(f"-j must be at least 1, got {jobs}")
    nvcc_path = find_nvcc(nvcc)
    version = nvcc_version(nvcc_path)
    if not src.is_dir():
        raise UsageError(f"source directory {src} does not exist (choose another with --src DIR)")
    cus = sorted(src.glob("*.cu"))
    if not cus:
        raise UsageError(f"no .cu files in {src}: nothing to build (choose another folder with --src DIR)")
    headers = sorted(src.glob(HEADER_GLOB))
    check_archs_supported(arch_list, nvcc_path)

    sources = {p.name: sha256_file(p) for p in cus}
    sources.update({p.name: sha256_file(p) for p in headers})
    cur = {"nvcc_version": version, "flags": compile_flags(src), "sources": sources}
    manifest_path = out_root / MANIFEST_NAME
    prev = {} if force else load_manifest(manifest_path)

    results: dict[tuple[str, str], Result] = {}
    todo: list[tuple[str, Path, Path]] = []
    for arch in arch_list:
        for cu in cus:
            out = out_root / arch / f"{cu.stem}.cubin"
            if not force and _is_up_to_date(prev, arch, cu.name, out, cur):
                results[(arch, cu.name)] = Result(arch, cu.name, out.name, "up to date")
            else:
                todo.append((arch, cu, out))

    say(f"nvcc: {nvcc_path} ({version})")
    say(
        f"{len(todo)} to build, {len(results)} up to date ({len(arch_list)} arch x {len(cus)} file"
        + (f", {min(jobs, len(todo))} jobs)" if todo else ")")
    )
    if todo:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futs = [pool.submit(_compile_one, nvcc_path, a, cu, o, cur["flags"], verbose) for a, cu, o in todo]
            for fut in concurrent.futures.as_completed(futs):
                r = fut.result()
                results[(r.arch, r.source)] = r
                rel = f"{r.arch}/{r.cubin}"
                if r.status == "built":
                    say(f"[{r.arch}] {r.source} -> {rel} ({r.seconds:.1f} s)")
                    for ln in _warning_lines(r.stderr):
                        say(f"  {ln}")
                    for k in r.kernels:
                        say(f"  ptxas {r.arch} {k.line()}")
                else:
                    say(f"[{r.arch}] {r.source} FAILED (nvcc exit {r.returncode}, {r.seconds:.1f} s)")
    elif verbose:
        say("everything is up to date: ptxas usage is printed only for what is compiled (add --force)")

    # The new manifest: everything that is vouched for under the current inputs.
    archs_out: dict[str, dict] = {}
    for (arch, _cu), r in results.items():
        if r.status in ("built", "up to date"):
            path = out_root / arch / r.cubin
            archs_out.setdefault(arch, {})[r.cubin] = {"sha256": sha256_file(path), "source": r.source}
    dropped: list[str] = []
    for arch, entries in (prev.get("architectures") or {}).items():
        if arch in arch_list or not isinstance(entries, dict):
            continue
        for cubin, info in entries.items():
            cu = info.get("source") if isinstance(info, dict) else None
            if cu in sources and _is_up_to_date(prev, arch, cu, out_root / arch / cubin, cur):
                archs_out.setdefault(arch, {})[cubin] = {"sha256": info["sha256"], "source": cu}
            else:
                dropped.append(f"{arch}/{cubin}")
    if dropped:
        say(f"dropped from the manifest (stale, not rebuilt: not in --arch): {', '.join(dropped)}")
    manifest = {
        "nvcc_version": version,
        "flags": cur["flags"],
        "sources": sources,
        "architectures": {a: dict(sorted(archs_out[a].items())) for a in sorted(archs_out)},
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(manifest_path, manifest)

    ordered = [results[(a, cu.name)] for a in arch_list for cu in cus]
    report = BuildReport(manifest, manifest_path, ordered, arch_list, [cu.name for cu in cus], dropped)
    failures = [r for r in ordered if r.status == "FAILED"]
    if failures:
        raise CompileError(failures, report)
    return report


def build(
    archs: Iterable[str] | str | None = None,
    out_dir: str | os.PathLike | None = None,
    jobs: int | None = None,
    force: bool = False,
    verbose: bool = False,
    nvcc: str | os.PathLike | None = None,
    src_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """:func:`run_build`, returning only the manifest dict."""
    return run_build(archs, out_dir, jobs, force, verbose, nvcc, src_dir, log).manifest


# --------------------------------------------------------------------------- CLI


def _arch_arg(value: str) -> str:
    try:
        parse_archs(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _jobs_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build.py",
        description="Compile cuda/*.cu into build/cubin/<arch>/<stem>.cubin and write manifest.json.",
    )
    p.add_argument(
        "--arch",
        action="append",
        type=_arch_arg,
        metavar="SM",
        help=f"target architecture, repeatable or comma-separated (default: {','.join(DEFAULT_ARCHS)})",
    )
    p.add_argument("--src", default=None, metavar="DIR", help="folder of .cu/.cuh files (default: cuda/)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: build/cubin)")
    p.add_argument("-j", "--jobs", type=_jobs_arg, default=None, metavar="N",
                   help=f"parallel nvcc processes (default: {os.cpu_count()})")
    p.add_argument("--force", action="store_true", help="rebuild everything, even what is up to date")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="pass -Xptxas -v and print each kernel's registers, spills and shared memory")
    p.add_argument("--nvcc", default=None, metavar="PATH",
                   help="the compiler (default: $NVCC, else nvcc on PATH, else /usr/local/cuda/bin/nvcc)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        report = run_build(
            archs=args.arch,
            out_dir=args.out,
            jobs=args.jobs,
            force=args.force,
            verbose=args.verbose,
            nvcc=args.nvcc,
            src_dir=args.src,
        )
    except CompileError as e:
        sys.stdout.flush()
        print(e.details(), file=sys.stderr, flush=True)
        print(e.report.summary())
        print(f"manifest: {e.report.manifest_path} (failed outputs left out)", flush=True)
        print(f"build.py: error: {e}", file=sys.stderr)
        return e.exit_code
    except BuildError as e:
        sys.stdout.flush()
        print(f"build.py: error: {e}", file=sys.stderr)
        return e.exit_code
    print(report.summary())
    print(f"manifest: {report.manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
