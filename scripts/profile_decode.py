"""Run decode attention at one shape, for a profiler (ncu) to look at, and time it.

python scripts/profile_decode.py [--shape llama2-7b] [--batch 8] [--context 16384] [--version 3]
                                 [--mode aligned] [--rule seed] [--reps 0] [--l2-fetch BYTES]

Needs a CUDA GPU (and the cubins, `python build.py`).

--reps N times N calls with CUDA events (after 3 untimed ones) and prints the median ms and
the bytes the kernels counted (a second, counting call), so an ncu run's DRAM bytes can be
set against them. --l2-fetch sets the context's CU_LIMIT_MAX_L2_FETCH_GRANULARITY (a hint
to the driver: 0-128 bytes) before any kernel runs, and prints what the driver kept.
--version defaults to the shape's default (kernels.default_decode_version).

DRAM bytes against counted bytes (docs/perf-notes.md, 2026-11-29 night):

    ncu --clock-control none --metrics dram__bytes_read.sum,gpu__time_duration.sum,\
lts__t_sectors_srcunit_tex_op_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        -k regex:"akv_decode_(scores|values)" --launch-skip 2 --launch-count 2 \
        python scripts/profile_decode.py --reps 1
"""
import argparse
import statistics

import torch

from akv_runtime import driver, workload
from akv_runtime.bench import SHAPES
from akv_runtime.cache import AlignedKVCache, cuda_unavailable_reason
from akv_runtime.cli import positive_int
from akv_runtime.kernels import DECODE_VERSIONS
from akv_runtime.reference import RULES, named_rule


def l2_fetch(nbytes: int | None) -> int:
    """Set (unless None) and return the context's L2 fetch granularity limit, in bytes."""
    cu = driver._cu
    limit = cu.CUlimit.CU_LIMIT_MAX_L2_FETCH_GRANULARITY
    if nbytes is not None:
        driver.check(cu.cuCtxSetLimit(limit, nbytes), "cuCtxSetLimit")
    return int(driver.check(cu.cuCtxGetLimit(limit), "cuCtxGetLimit"))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES),
                        help="attention shape (bench.SHAPES; default llama2-7b)")
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences (default 8)")
    parser.add_argument("--context", type=positive_int, default=16384,
                        help="tokens per sequence (default 16384)")
    parser.add_argument("--version", type=int, default=None, choices=DECODE_VERSIONS,
                        help="decode kernel version (default: the shape's default)")
    parser.add_argument("--mode", default="aligned", choices=["aligned", "full"],
                        help="aligned (the rule's tiers) or full (16 bits); default aligned")
    parser.add_argument("--rule", default="seed", choices=sorted(RULES),
                        help="named rule (reference.RULES; default seed)")
    parser.add_argument("--reps", type=int, default=0,
                        help="time this many calls with CUDA events (default 0: none)")
    parser.add_argument("--l2-fetch", type=int, default=None,
                        help="set CU_LIMIT_MAX_L2_FETCH_GRANULARITY to this many bytes first")
    parser.add_argument("--v-rule", default="auto", choices=("auto", "always", "never"),
                        help="when the V rule runs (AlignedKVCache v_rule; auto: calls of at most "
                             "128 MiB of V read V whole, the V-whole path's flash kernel and "
                             "combine)")
    args = parser.parse_args()
    reason = cuda_unavailable_reason()
    if reason is not None:
        parser.exit(2, f"profile_decode: needs a CUDA GPU ({reason})\n")
    Hq, Hk, D = SHAPES[args.shape]
    rng = torch.Generator(device="cuda")
    rng.manual_seed(0)
    cache = AlignedKVCache(1, Hk, D, args.context, num_query_heads=Hq, batch_size=args.batch,
                           backend="cuda", rule=named_rule(args.rule), v_rule=args.v_rule)
    print("L2 fetch granularity limit:", l2_fetch(args.l2_fetch), "bytes")
    if args.version is not None:
        cache._backend.set_decode_version(args.version)
    k, v = workload.synthetic_kv(rng, args.batch, Hk, args.context, D, 0.5)
    q = workload.synthetic_q(rng, args.batch, Hq, D, 0.5, num_kv_heads=Hk)
    cache.append(0, k, v)
    out = torch.empty_like(q)
    for _ in range(3):
        cache.attend(0, q, mode=args.mode, out=out)
    torch.cuda.synchronize()
    if args.reps > 0:
        times = []
        for _ in range(args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            cache.attend(0, q, mode=args.mode, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        cache.reset_counters()
        cache.attend(0, q, mode=args.mode, out=out, count=True)
        counted = cache.counters()
        total = sum(v for n, v in counted.items() if n != "bits_per_value")
        version = cache._backend.decode_version
        print(f"{args.shape} B={args.batch} ctx={args.context} v{version} {args.rule}: "
              f"median {statistics.median(times):.4f} ms, counted {total / 1e6:.1f} MB "
              f"{counted['bits_per_value']}")
        print("  counters (bytes):", {n: c for n, c in counted.items() if n != "bits_per_value"})
    print("done", cache.device)


if __name__ == "__main__":
    main()
