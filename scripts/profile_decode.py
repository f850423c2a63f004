"""Run decode attention a few times at one shape, for a profiler (ncu) to look at.

python scripts/profile_decode.py [--shape llama2-7b] [--batch 8] [--context 16384] [--version 3]
                                 [--rule seed]
"""
import argparse

import torch

from akv_runtime import workload
from akv_runtime.bench import SHAPES
from akv_runtime.cache import AlignedKVCache
from akv_runtime.reference import named_rule


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--version", type=int, default=3)
    parser.add_argument("--mode", default="aligned")
    parser.add_argument("--rule", default="seed", help="named rule (reference.RULES)")
    args = parser.parse_args()
    Hq, Hk, D = SHAPES[args.shape]
    rng = torch.Generator(device="cuda")
    rng.manual_seed(0)
    cache = AlignedKVCache(1, Hk, D, args.context, num_query_heads=Hq, batch_size=args.batch,
                           backend="cuda", rule=named_rule(args.rule))
    cache._backend.set_decode_version(args.version)
    k, v = workload.synthetic_kv(rng, args.batch, Hk, args.context, D, 0.5)
    q = workload.synthetic_q(rng, args.batch, Hq, D, 0.5, num_kv_heads=Hk)
    cache.append(0, k, v)
    out = torch.empty_like(q)
    for _ in range(3):
        cache.attend(0, q, mode=args.mode, out=out)
    torch.cuda.synchronize()
    print("done", cache.device)


if __name__ == "__main__":
    main()
