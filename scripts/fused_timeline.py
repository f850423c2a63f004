"""Where the fused decode kernel's time goes: a timeline of one cluster's CTAs, phase by phase.

python scripts/fused_timeline.py HQ:HK:D:B:CTX:CLUSTER [...]   e.g. 32:8:128:1:4096:16

Needs a CUDA GPU of compute capability 9.0 and nvcc. Compiles cuda/akv_fused.cu with
-DAKVF_TIMING into a temporary directory (the project's cubins carry no timing code), points
the runtime at it ($AKV_CUBIN_DIR, with the project's akv.cubin beside it), runs six decode
calls on synthetic K/V (the benchmark's workload statistics) and prints, for the last four:

* each phase's duration on CTA rank 0 of the cluster of (KV head 0, sequence 0), from the SM
  clock at the kernel's AKVF_MARK points (microseconds at the SM clock the GPU reports);
* when each cluster's first CTA started and its last ended (global timer, ns resolution as
  the GPU gives it), which shows clusters that waited for room or shared multiprocessors.

$FORCE_SMEM=N asks for at least N bytes of dynamic shared memory per CTA (so that fewer
CTAs share a multiprocessor). docs/perf-notes.md (tenth session) has what it showed.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from akv_runtime import driver, kernels, workload  # noqa: E402
from akv_runtime.cache import AlignedKVCache  # noqa: E402
from akv_runtime.reference import named_rule  # noqa: E402

PHASES = ["rt1", "rt2", "k tiers", "k wait", "scores", "block stats", "barrier 1", "estimate",
          "O_est", "barrier 2", "-", "v tiers+copies", "v wait", "values", "barrier 3",
          "output", "-"]


def timing_cubins(tmp: Path) -> Path:
    src = driver.cubin_dir()
    manifest = json.loads((src / "manifest.json").read_text())
    (tmp / "sm_90").mkdir(parents=True)
    shutil.copy(src / "sm_90" / "akv.cubin", tmp / "sm_90" / "akv.cubin")
    subprocess.run(["nvcc", "-cubin", "-O3", "-lineinfo", "-std=c++17", "-I", str(ROOT / "cuda"),
                    "-arch=sm_90", "-DAKVF_TIMING", str(ROOT / "cuda" / "akv_fused.cu"), "-o",
                    str(tmp / "sm_90" / "akv_fused.cubin")], check=True)
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return tmp


def main(specs):
    if os.environ.get("FORCE_SMEM"):
        orig = kernels.fused_smem_bytes
        kernels.fused_smem_bytes = lambda D, G, bpc: max(orig(D, G, bpc),
                                                         int(os.environ["FORCE_SMEM"]))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AKV_CUBIN_DIR"] = str(timing_cubins(Path(tmp)))
        cu = driver._cu
        clock_hz = torch.cuda.get_device_properties(0).clock_rate * 1e3 \
            if hasattr(torch.cuda.get_device_properties(0), "clock_rate") else 1.98e9
        for spec in specs:
            Hq, Hk, D, B, ctx, cl = (int(x) for x in spec.split(":"))
            g = torch.Generator(device="cuda")
            g.manual_seed(1)
            cache = AlignedKVCache(1, Hk, D, ctx, num_query_heads=Hq, batch_size=B,
                                   backend="cuda", v_rule="always")   # the fused kernel's path
            k, v = workload.synthetic_kv(g, B, Hk, ctx, D, 0.5)
            cache.append(0, k, v)
            q = workload.synthetic_q(g, B, Hq, D, 0.5, num_kv_heads=Hk)
            be = cache._backend
            be.fused, be.fused_cluster = "always", cl
            out = torch.empty_like(q)
            mod = driver.load_module(be.dev, "akv_fused")
            times_ptr, _ = driver.check(cu.cuModuleGetGlobal(mod.handle, b"_ZN4akvf10akvf_timesE"))
            span_ptr, _ = driver.check(cu.cuModuleGetGlobal(mod.handle, b"_ZN4akvf9akvf_spanE"))
            rows = []
            for rep in range(6):
                cache.attend(0, q, out=out, rule=named_rule("tuned"))
                torch.cuda.synchronize()
                host = np.zeros((16, 24), np.int64)
                driver.copy_to_host(host, int(times_ptr))
                if rep >= 2:
                    rows.append(host[:cl, :18].copy())
            t = np.median(np.stack(rows), axis=0)
            d = np.diff(t, axis=1) / clock_hz * 1e6
            print(f"{spec}: CTA rank 0 from start to end {(t[0, 17] - t[0, 0]) / clock_hz * 1e6:.2f} us")
            print("  " + ", ".join(f"{n} {d[0, i]:.2f}" for i, n in enumerate(PHASES) if n != "-"))
            span = np.zeros((256, 16, 2), np.uint64)
            driver.copy_to_host(span, int(span_ptr))
            n = min(Hk * B, 256)
            st = span[:n, :cl, 0].astype(np.int64)
            en = span[:n, :cl, 1].astype(np.int64)
            t0 = st.min()
            print("  clusters start (us): " + " ".join(f"{(x - t0) / 1e3:.1f}" for x in st.min(axis=1)))
            print("  clusters end (us):   " + " ".join(f"{(x - t0) / 1e3:.1f}" for x in en.max(axis=1)))
            cache.close()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
