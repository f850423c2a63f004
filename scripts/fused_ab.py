"""The fused decode kernel against the four launches, by cluster size, at 4k tokens.

python scripts/fused_ab.py [N]     (the first N of the four cases; default all)

Needs a CUDA GPU of compute capability 9.0 and the cubins (`python build.py --arch sm_90`).
For each case (query heads, KV heads, head_dim, batch, context: Llama-3-8B 1 x 4k,
Llama-2-7B 1 x 4k, SmolLM2 1 x 4k, Llama-3-8B 8 x 4k) it prints the CUDA-graph median of one
aligned call (tuned rule, the benchmark's synthetic K/V, 4 layers rotated) through the four
launches ("four") and the fused kernel with clusters of 8 and 16 CTAs ("f8", "f16"), and
what cuOccupancyMaxActiveClusters says for each cluster size. $FORCE_SMEM=N asks for at
least N bytes of dynamic shared memory per CTA (fewer CTAs per multiprocessor).
docs/perf-notes.md (tenth session) has what it showed.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from akv_runtime import driver, kernels, workload  # noqa: E402
from akv_runtime.bench import _median_graph_ms  # noqa: E402
from akv_runtime.cache import AlignedKVCache  # noqa: E402
from akv_runtime.reference import named_rule  # noqa: E402

if os.environ.get("FORCE_SMEM"):
    _orig = kernels.fused_smem_bytes
    kernels.fused_smem_bytes = lambda D, G, bpc: max(_orig(D, G, bpc), int(os.environ["FORCE_SMEM"]))

CASES = [(32, 8, 128, 1, 4096), (32, 32, 128, 1, 4096), (9, 3, 64, 1, 4096), (32, 8, 128, 8, 4096)]


def main(count: int) -> None:
    rule = named_rule("tuned")
    g = torch.Generator(device="cuda")
    g.manual_seed(1)
    for Hq, Hk, D, B, ctx in CASES[:count]:
        rot = 4
        # the fused kernel serves calls that apply the V rule (v_rule "auto" reads V whole at
        # these sizes and never launches it)
        cache = AlignedKVCache(rot, Hk, D, ctx, num_query_heads=Hq, batch_size=B, backend="cuda",
                               v_rule="always")
        qs = []
        for layer in range(rot):
            k, v = workload.synthetic_kv(g, B, Hk, ctx, D, 0.5)
            cache.append(layer, k, v)
            qs.append(workload.synthetic_q(g, B, Hq, D, 0.5, num_kv_heads=Hk))
        out = torch.empty_like(qs[0])
        be = cache._backend
        res = {}
        for label, fused, cl in (("four", False, None), ("f8", "always", 8), ("f16", "always", 16)):
            be.fused, be.fused_cluster = fused, cl
            res[label] = _median_graph_ms(
                torch, lambda i: cache.attend(i, qs[i], out=out, rule=rule), 20, rot) * 1e3
        occ = {cl: driver.max_active_clusters(
                   be.k_fused, cl, kernels.FUSED_THREADS,
                   kernels.fused_smem_bytes(D, Hq // Hk, kernels.fused_geometry(-(-ctx // 64), cl)[1]))
               for cl in (8, 16)}
        print(f"Hq={Hq} Hk={Hk} D={D} B={B} ctx={ctx}: "
              + " ".join(f"{k} {v:.1f} us" for k, v in res.items())
              + f"; max active clusters of 8 / 16: {occ[8]} / {occ[16]}", flush=True)
        cache.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else len(CASES))
