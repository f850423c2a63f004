"""Decode-attention benchmark (GPU): ``python -m akv_runtime.bench [--quick] [--json PATH]``.

Times, in one run on the same data, torch SDPA (cuDNN and flash backends), plain eager
attention, our ``full`` mode and our ``aligned`` mode, plus a device-to-device copy for the
bandwidth ceiling; reports ms (median of CUDA-graph replays; a shape's candidates are
timed in interleaved rounds of shuffled order, :func:`_interleaved_median_ms`), the
speed-up against cuDNN, the
bytes our kernels read (their own counters), bits per value, effective bandwidth and its
fraction of the copy bandwidth, and the GPU time of appending one decode token to a layer
over one layer's aligned attention (:func:`append_graph_ms`). Buffers rotate over up to 8 layers so that repeated calls
read four times the L2 (60 MB) where 8 layers suffice; the smallest shapes (SmolLM2 at 1 x 4k:
8 x 3 MB) stay partly L2-resident, for every column alike. Prints a short table last and
writes JSON. The kernel versions timed are --versions plus each shape's default;
$AKV_DECODE_VERSION is ignored (a malformed value is still refused), $AKV_SPLIT_BLOCKS
applies to every split-KV kernel and $AKV_WHOLE_KERNEL to the V-whole path's default
columns (both recorded in the JSON). --case replaces the grid (with or
without --quick).

K/V and q: drawn from SmolLM2-measured per-channel statistics
(:func:`akv_runtime.workload.synthetic_kv`, docs/workload.md), labelled so in the output;
never presented as model data. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path


SHAPES = {
    # name: (query heads, kv heads, head_dim)
    "llama2-7b": (32, 32, 128),
    "llama3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
    # GQA group 8 (--case only, not in the grids): Llama-3-70B's attention shape
    "llama3-70b": (64, 8, 128),
}
#: the shapes of issue 4's grid
GRID_SHAPES = ("llama2-7b", "llama3-8b", "smollm2-135m")
QUICK_GRID = [("llama2-7b", 1, 4096), ("llama2-7b", 8, 4096), ("llama2-7b", 8, 16384),
              ("llama2-7b", 8, 32768), ("llama3-8b", 8, 16384), ("smollm2-135m", 8, 2048)]


def full_grid():
    grid = []
    for shape in GRID_SHAPES:
        for batch in (1, 8, 32):
            for ctx in (4096, 16384, 32768):
                grid.append((shape, batch, ctx))
        grid.append((shape, 1, 131072))
    return grid


def _capture_graph(torch, fn, reps: int, rotate: int):
    """A CUDA graph of ``reps`` calls cycling ``rotate`` buffer sets (fn(i) runs on set
    i % rotate), after one uncaptured call per set (module load, workspace). The kernels'
    arguments are copied into the graph at capture, so a backend may change state after."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(rotate):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i % rotate)
    return graph


def _interleaved_median_ms(torch, graphs: dict, rounds: int = 7,
                           errors: dict | None = None) -> dict:
    """Median ms of one replay of each captured graph (name -> graph), timed in ``rounds``
    rounds that replay every graph once, each round in its own shuffled order (seeded, so
    a run repeats), after one untimed replay each. Timing the candidates round by round
    rather than one after another keeps a drift of the GPU's speed over the run out of
    their ratios, and the shuffles a candidate's place in the round (what ran just before
    it). It does not remove the spread between two graphs of the same kernels at the
    largest shapes (up to 8 % in the eleventh session's grid; docs/perf-notes.md). Where
    the data fit in L2, the candidate before a graph in its round evicts some of its data,
    which back-to-back replays of one graph (earlier sessions' timing) did not.

    With an ``errors`` dict, a graph whose replay raises gets None, its exception (type:
    message) goes into ``errors`` under its name, and it leaves the later rounds; the others
    are timed on. Without one, the exception propagates."""
    samples = {name: [] for name in graphs}
    failed = {}

    def replay(name, graph):
        try:
            graph.replay()
        except Exception as exc:  # noqa: BLE001 - one candidate's failure is data
            if errors is None:
                raise
            failed[name] = f"{type(exc).__name__}: {exc}"[:200]

    for name, graph in graphs.items():
        replay(name, graph)
    torch.cuda.synchronize()
    order = list(graphs.items())
    shuffle = random.Random(2026)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name, graph in order:
            if name in failed:
                continue
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            replay(name, graph)
            end.record()
            end.synchronize()
            if name not in failed:
                samples[name].append(start.elapsed_time(end))
    if errors is not None:
        errors.update(failed)
    return {name: None if name in failed else statistics.median(t)
            for name, t in samples.items()}


def _median_graph_ms(torch, fn, reps: int, rotate: int) -> float:
    """Median ms of one call, from CUDA-graph replays of ``reps`` calls cycling ``rotate``
    buffer sets (fn(i) runs on set i % rotate)."""
    graph = _capture_graph(torch, fn, reps, rotate)
    ms = _interleaved_median_ms(torch, {"call": graph})["call"] / reps
    del graph
    return ms


def append_graph_ms(torch, cache, k, v, reps: int = 16) -> float:
    """GPU time (ms) of appending one decode token (``k``, ``v``: float16 [batch, kv_heads,
    1, head_dim], torch) to one layer of ``cache``: the median of 7 replays of a CUDA graph
    that appends it to every layer ``reps`` times, less that of a graph of the same shape
    without the appends (the two timed in interleaved rounds), divided by
    ``reps * num_layers``.

    Each round of the graph ends by copying the saved device lengths back, so every replay
    writes the same position (the cache needs one free token per layer; its host-side
    lengths are restored afterwards). So the time is the append kernel's own,
    without Python's launch overhead, which a decode step captured in a graph does not pay
    either."""
    lengths = torch.from_dlpack(cache._backend.ws["lengths"])    # int32 [layers, batch]
    saved, host = lengths.clone(), cache._lengths.copy()
    layers = range(cache.num_layers)

    def round_(append: bool):
        if append:
            for layer in layers:
                cache.append(layer, k, v)
        lengths.copy_(saved)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs = {}
    for append in (True, False):
        with torch.cuda.stream(stream):
            round_(append)                              # warm-up: launch plans, module
        torch.cuda.synchronize()
        cache._lengths[:] = host
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                round_(append)
        cache._lengths[:] = host
        graphs[append] = graph
    torch.cuda.synchronize()
    ms = _interleaved_median_ms(torch, graphs)
    if not torch.equal(lengths, saved):
        raise RuntimeError("append timing: the device lengths were not restored")
    del graphs
    return max(0.0, ms[True] - ms[False]) / (reps * cache.num_layers)


def copy_bandwidth(torch, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written: the
    median of 20 event-timed copies of ``nbytes`` (after warm-up)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3)


def bench_case(torch, shape_name, batch, ctx, rule, copy_bw, l2_bytes, reps, rng,
               versions=(3,)):
    from .cache import AlignedKVCache
    from .reference import bits_per_value
    Hq, Hk, D = SHAPES[shape_name]
    G = Hq // Hk
    layer_bytes = batch * Hk * ctx * D * 2 * 2
    rotate = int(min(8, max(1, math.ceil(4 * l2_bytes / layer_bytes))))
    from . import workload
    # one spare block per sequence, so appending a decode token can be timed at the end
    cache = AlignedKVCache(rotate, Hk, D, ctx + 64, num_query_heads=Hq, batch_size=batch,
                           backend="cuda")
    ks, vs, qs = [], [], []
    for layer in range(rotate):
        # each rotation buffer takes the statistics of a different relative depth
        depth = (layer + 0.5) / rotate
        k, v = workload.synthetic_kv(rng, batch, Hk, ctx, D, depth)
        q = workload.synthetic_q(rng, batch, Hq, D, depth, num_kv_heads=Hk)
        cache.append(layer, k, v)
        ks.append(k)
        vs.append(v)
        qs.append(q)
    out = torch.empty_like(qs[0])
    F = torch.nn.functional
    from torch.nn.attention import SDPBackend, sdpa_kernel
    result = {"shape": shape_name, "batch": batch, "context": ctx, "query_heads": Hq,
              "kv_heads": Hk, "head_dim": D, "rotate": rotate, "kv_source": workload.SYNTHETIC_LABEL}

    def sdpa(i, backend):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qs[i][:, :, None], ks[i], vs[i],
                                                  enable_gqa=G > 1)

    def eager(i):
        q = qs[i].view(batch, Hk, G, D)
        s = torch.matmul(q, ks[i].transpose(-1, -2)) * (1.0 / math.sqrt(D))
        return torch.matmul(torch.softmax(s, dim=-1), vs[i])

    def ours(mode):
        return lambda i: cache.attend(i, qs[i], mode=mode, out=out, rule=rule)

    candidates = [("sdpa_cudnn", None, lambda i: sdpa(i, SDPBackend.CUDNN_ATTENTION)),
                  ("sdpa_flash", None, lambda i: sdpa(i, SDPBackend.FLASH_ATTENTION)),
                  ("eager", None, eager)]
    from .kernels import default_decode_version, env_fused, env_whole_kernel
    default = default_decode_version(G, D)
    result["default_version"] = default
    backend = cache._backend
    fused = backend._use_fused(-(-ctx // 64), Hk, batch)
    whole = not cache.v_rule_applies(0)
    # "path": what a cache runs by default here (v_rule "auto"): the V-whole path (the flash
    # kernel and the combine, or $AKV_WHOLE_KERNEL's choice), the fused kernel,
    # or the four launches of the default version; the untagged akv_full / akv_aligned time
    # that path, the _vN ones version N's own kernels: the V rule's four launches on every
    # call (v_rule "always"), and full mode in its three launches
    result["path"] = "whole" if whole else ("fused" if fused else "four")
    for version in sorted(set(versions) | {default}):
        candidates += [(f"akv_full_v{version}", version, ours("full")),
                       (f"akv_aligned_v{version}", version, ours("aligned"))]
    candidates += [("akv_full", "default", ours("full")),
                   ("akv_aligned", "default", ours("aligned")),
                   # the V-whole path at every size (v_rule "never"): its default kernels
                   # ($AKV_WHOLE_KERNEL, unset: the flash kernel and the combine), the split
                   # kernel and the combine, the default version's three launches
                   ("akv_whole", "whole", ours("aligned")),
                   ("akv_split", "split", ours("aligned")),
                   ("akv_whole3", "three", ours("aligned"))]
    # every candidate captured first, then timed in interleaved rounds
    # (_interleaved_median_ms), so that no candidate is favoured by its place in the run
    graphs, times = {}, {}
    for name, version, fn in candidates:
        # the default path and "whole" follow $AKV_WHOLE_KERNEL; "split" is the split
        # kernel, "three" and version N's own kernels (akv_full_vN) the three launches
        backend.whole_kernel = (env_whole_kernel() if version in ("default", "whole") else
                                "split" if version == "split" else "three")
        if version == "default":               # the cache's default path (v_rule "auto")
            backend.fused = env_fused()
            backend.set_decode_version(default)
            cache.v_rule = "auto"
        elif version in ("whole", "split", "three"):   # the V-whole path on every call
            backend.set_decode_version(default)
            cache.v_rule = "never"
        elif version is not None:              # the four launches of version N (the V rule)
            backend.fused = False
            backend.set_decode_version(version)
            cache.v_rule = "always"
        try:
            graphs[name] = _capture_graph(torch, fn, reps, rotate)
        except Exception as exc:  # noqa: BLE001 - a backend may not support a shape
            times[name] = None
            result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:200]
    replay_errors = {}
    times.update({name: None if ms is None else ms / reps for name, ms in
                  _interleaved_median_ms(torch, graphs, errors=replay_errors).items()})
    for name, message in replay_errors.items():
        result.setdefault("errors", {})[name] = message
    del graphs
    result["ms"] = {name: times[name] for name, _, _ in candidates}
    backend.fused = env_fused()
    backend.whole_kernel = env_whole_kernel()
    backend.set_decode_version(default)
    cache.v_rule = "auto"
    # each decode phase alone (aligned mode, default kernels), to place the time
    from .arrays import describe
    q_infos = [describe(q, "q") for q in qs]
    phase_ms = {}
    names = [name for name, _ in cache._backend.decode_phases(
        0, q_infos[0], out.data_ptr(), "aligned", rule, 0, v_whole=whole)]   # launches nothing
    for k, name in enumerate(names):
        def one(i, k=k):
            stream = torch.cuda.current_stream().cuda_stream
            cache._backend.decode_phases(i, q_infos[i], out.data_ptr(), "aligned", rule,
                                         stream, v_whole=whole)[k][1]()
        phase_ms[name] = _median_graph_ms(torch, one, reps, rotate)
    result["phase_ms"] = phase_ms
    # bytes read, from the kernels' own counters (one counted call per layer)
    per_mode = {}
    for mode in ("full", "aligned"):
        cache.reset_counters()
        for i in range(rotate):
            cache.attend(i, qs[i], mode=mode, out=out, count=True, rule=rule)
        c = cache.counters()
        plane = sum(c[n] for n in ("k_hi_bytes", "k_mid_bytes", "k_lo_bytes", "v_hi_bytes",
                                   "v_mid_bytes", "v_lo_bytes")) / rotate
        meta = c["metadata_bytes"] / rotate
        nblk = -(-ctx // 64)
        # scores (w+r; the flash kernel writes none) + partials (w+r, at most one per block)
        flash = (mode == "full" or whole) and backend.whole_kernel == "flash"
        workspace = batch * Hq * ((0 if flash else ctx * 4 * 2) + nblk * D * 4 * 2)
        per_mode[mode] = {"bits_per_value": c["bits_per_value"],
                          "plane_bytes": plane, "metadata_bytes": meta,
                          "workspace_bytes": workspace}
    result["bytes"] = per_mode
    result["fp16_kv_bytes"] = layer_bytes
    base = times.get("sdpa_cudnn") or times.get("sdpa_flash")
    if base:  # the fp16 roof in practice: what cuDNN reads per second on the same data
        result["cudnn_read_TBps"] = layer_bytes / (base * 1e-3) / 1e12
    for mode in ("full", "aligned"):
        t = times.get(f"akv_{mode}")
        if t:
            b = per_mode[mode]
            total = b["plane_bytes"] + b["metadata_bytes"] + b["workspace_bytes"]
            result[f"{mode}_bandwidth_TBps"] = total / (t * 1e-3) / 1e12
            result[f"{mode}_fraction_of_copy"] = total / (t * 1e-3) / copy_bw
            if base:
                result[f"{mode}_speedup_vs_sdpa"] = base / t
    # appending one decode token to every layer against one layer's decode attention
    one_k = ks[0][:, :, :1].clone()
    one_v = vs[0][:, :, :1].clone()
    del ks, vs
    result["append_one_token_ms"] = append_graph_ms(torch, cache, one_k, one_v)
    if times.get("akv_aligned"):
        result["append_over_attention"] = result["append_one_token_ms"] / times["akv_aligned"]
    cache.close()
    del cache, qs
    torch.cuda.empty_cache()
    return result


def format_table(rows, copy_bw) -> str:
    """The short table: one row per case; ``algn vN`` columns for every kernel version timed
    (four launches, the V rule on every call); column ``v`` is the path a cache runs by
    default, ``v_rule="auto"`` (``W``: the V-whole path, ``F``: the fused kernel, else the
    default version's four launches), whose times are the ``aligned`` column (``full``: full
    mode, the V-whole path from version 3 on); ``whole`` / ``split`` / ``whole3``: the
    V-whole path at every size (``v_rule="never"``) in its default kernels (the flash kernel
    and the combine) / in the split kernel and the combine / in the default version's three
    launches (rows of older runs: n/a)."""
    versions = sorted({int(k.rsplit("_v", 1)[1]) for r in rows for k in r["ms"]
                       if k.startswith("akv_aligned_v")} |
                      {r["default_version"] for r in rows if "default_version" in r})
    vcols = "".join(f" {'algn v' + str(v):>7}" for v in versions)
    head = (f"{'shape':<13}{'B':>3}{'ctx':>7} {'cudnn':>7} {'flash':>7} {'eager':>7}{vcols} "
            f"{'v':>2} {'full':>7} {'aligned':>8} {'whole':>7} {'split':>7} {'whole3':>7} "
            f"{'x cudnn':>8} {'x eager':>8} {'bits':>6} {'TB/s':>6} {'%copy':>6} {'append':>7}")
    lines = [f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write); times in ms", head,
             "-" * len(head)]
    fmt = lambda v: f"{v:7.3f}" if v else "    n/a"  # noqa: E731
    for r in rows:
        t = r["ms"]
        default = r.get("default_version")
        fused = r.get("path") == "fused"
        four = r.get("path") in (None, "four")
        per_version = "".join(       # rows written before the fused path: untagged = default
            " " + fmt(t.get(f"akv_aligned_v{v}") or
                      (t.get("akv_aligned") if v == default and four else None))
            for v in versions)
        # F: the fused kernel; W: the V-whole path (V at 16 bits, v_rule "auto")
        path = "F" if fused else ("W" if r.get("path") == "whole" else
                                  (default if default is not None else "?"))
        lines.append(
            f"{r['shape']:<13}{r['batch']:>3}{r['context']:>7} {fmt(t.get('sdpa_cudnn'))} "
            f"{fmt(t.get('sdpa_flash'))} {fmt(t.get('eager'))}{per_version} "
            f"{path:>2} {fmt(t.get('akv_full'))} "
            f"{fmt(t.get('akv_aligned')):>8} {fmt(t.get('akv_whole'))} "
            f"{fmt(t.get('akv_split'))} {fmt(t.get('akv_whole3'))} "
            f"{r.get('aligned_speedup_vs_sdpa', 0):8.2f} "
            f"{(t['eager'] / t['akv_aligned']) if t.get('eager') and t.get('akv_aligned') else 0:8.2f} "
            f"{r['bytes']['aligned']['bits_per_value']['total']:6.2f} "
            f"{r.get('aligned_bandwidth_TBps', 0):6.2f} "
            f"{100 * r.get('aligned_fraction_of_copy', 0):5.0f}% "
            f"{100 * r.get('append_over_attention', 0):6.1f}%")
    return "\n".join(lines)


def _grid_and_versions(parser, args):
    """The cases (shape, batch, context) and kernel versions the arguments ask for; a usage
    error (one line, exit 2) for anything malformed."""
    if args.case:
        grid = []
        for spec in args.case:
            parts = spec.split(":")
            if len(parts) != 3:
                parser.error(f"--case: expected shape:batch:context, got {spec!r}")
            shape, b, c = parts
            if shape not in SHAPES:
                parser.error(f"--case: unknown shape {shape!r}; shapes are {list(SHAPES)}")
            try:
                b, c = int(b), int(c)
            except ValueError:
                parser.error(f"--case: batch and context must be integers, got {spec!r}")
            if b < 1 or c < 1:
                parser.error(f"--case: batch and context must be positive, got {spec!r}")
            grid.append((shape, b, c))
    else:
        grid = QUICK_GRID if args.quick else full_grid()
    from .kernels import DECODE_VERSIONS
    try:
        versions = (DECODE_VERSIONS if args.versions is None else
                    tuple(sorted({int(v) for v in args.versions.split(",")})))
    except ValueError:
        parser.error(f"--versions: expected numbers like 2,3, got {args.versions!r}")
    if not set(versions) <= set(DECODE_VERSIONS):
        parser.error(f"--versions: known versions are {DECODE_VERSIONS}")
    return grid, versions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m akv_runtime.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a short grid of 6 cases instead of the full 30")
    parser.add_argument("--case", action="append", default=[],
                        help="shape:batch:context, e.g. llama2-7b:8:16384 (repeatable)")
    from .cli import positive_int
    parser.add_argument("--reps", type=positive_int, default=20,
                        help="calls per graph replay (default 20)")
    parser.add_argument("--versions", default=None,
                        help="decode kernel versions to time, comma-separated (default all; "
                             "each shape's default version, kernels.default_decode_version, "
                             "is always timed and is the untagged 'full'/'aligned')")
    parser.add_argument("--json", help="write the results here")
    from .reference import RULES, named_rule
    parser.add_argument("--rule", default="seed", choices=sorted(RULES),
                        help="named precision-alignment rule for the aligned mode "
                             "(default seed)")
    args = parser.parse_args(argv)
    rule = named_rule(args.rule)
    # every argument is checked before the GPU is looked for
    grid, versions = _grid_and_versions(parser, args)
    from .kernels import env_decode_version, env_fused, env_split_blocks, env_whole_kernel
    try:
        env_fused()
        env_whole_kernel()
        env_decode_version()        # ignored here (--versions decides), but a cache refuses
        forced_split = env_split_blocks()      # a bad value: refuse it now, not mid-run
    except ValueError as exc:
        parser.error(str(exc))
    from .cli import output_path_problem
    problem = output_path_problem(args.json) if args.json else None
    if problem:
        parser.error(f"--json: {problem}")
    from .cache import cuda_unavailable_reason
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"bench: timings need a CUDA GPU ({reason})", file=sys.stderr)
        return 2
    import torch
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    copy_bw = copy_bandwidth(torch)
    rng = torch.Generator(device="cuda")
    rng.manual_seed(240916546)
    rows = []
    for shape, b, c in grid:
        t0 = time.time()
        rows.append(bench_case(torch, shape, b, c, rule, copy_bw, l2, args.reps, rng,
                               versions))
        ms = {k: round(v, 4) for k, v in rows[-1]["ms"].items() if v}
        phases = {k: round(v, 4) for k, v in rows[-1]["phase_ms"].items()}
        print(f"  {shape} B={b} ctx={c}: {ms} phases {phases} ({time.time() - t0:.1f} s)",
              flush=True)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "copy_bandwidth_Bps": copy_bw, "rule": rule.name,
              "date": time.strftime("%Y-%m-%d"), "forced_split_blocks": forced_split,
              "whole_kernel": env_whole_kernel(),
              "rows": rows}
    if args.json:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=float)
    print(format_table(rows, copy_bw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
