"""GPU tests of the fused decode kernel (cuda/akv_fused.cu: the whole decode call in one launch
of thread-block clusters, up to 64 blocks per sequence, compute capability 9.0) against the
numpy reference and the four launches. It does not depend on the decode kernel version, so
these run once, not under each version as tests/test_gpu_kernels.py does; the full-mode,
decode-step, stream and Inf/NaN tests there run it too (their ``fused`` cases)."""

import numpy as np
import pytest

from akv_runtime import reference as R
from akv_runtime.layout import BLOCK_TOKENS

from test_gpu_kernels import (ALIGNED_SHAPES, SKIPPING, append_both, check_aligned_call,
                              kv_like, make_pair, uses_fused)

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("rule", [R.SEED_RULE, SKIPPING], ids=["seed", "v_skip"])
@pytest.mark.parametrize("D,Hk,Hq,B,n,paged", ALIGNED_SHAPES + [
    (128, 2, 8, 2, 4096, True),    # 64 blocks
    (64, 3, 9, 1, 4033, False)])   # 64, one token into the last
@pytest.mark.parametrize("cluster", [8, 16])
def test_fused_decode_tiers_and_output(rng, D, Hk, Hq, B, n, paged, rule, cluster):
    """The fused kernel (cuda/akv_fused.cu, one launch of clusters) under the same checks
    as the four launches above: tiers, statistics, O_est, counters and output against the
    reference. Clusters of 8 and 16 CTAs: 1 to 8 blocks per CTA (8 at 64 blocks in clusters
    of 8), CTAs without blocks at the short lengths."""
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n, paged, fused="always")
    gpu._backend.fused_cluster = cluster
    check_aligned_call(rng, gpu, cpu, D, Hk, Hq, B, n, rule)



@pytest.mark.parametrize("D,Hk,Hq", [(64, 3, 9), (128, 2, 8), (128, 4, 4), (128, 1, 8)])
@pytest.mark.parametrize("topk", [1, 32, 100])
@pytest.mark.parametrize("cluster", [8, 16])
def test_fused_matches_four_launches_over_mixed_lengths(rng, D, Hk, Hq, topk, cluster):
    """One paged batch of 1, 33, 64 and 47 blocks (tied block maxima in two sequences, as
    above) through the fused kernel and through the four launches: the same K tiers and K
    bytes (an integer function of q and the exponent maxima), statistics and O_est equal to
    fp32 summation order, V bytes within 0.1 % (a weight that exp() rounds across a power of
    two may change a tier), and both outputs against the reference."""
    B, n = 4, 64 * BLOCK_TOKENS
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n, paged=True, fused="always")
    K, V = kv_like(rng, B, Hk, n, D)
    pick = rng.integers(0, 3, n // BLOCK_TOKENS)
    pat = K[2:, :, :3 * BLOCK_TOKENS].reshape(2, Hk, 3, BLOCK_TOKENS, D)
    K[2:] = pat[:, :, pick].reshape(2, Hk, n, D)
    append_both(gpu, cpu, 0, K, V)
    lengths = np.array([1, 2100, n, 3000], np.int32)
    torch.from_dlpack(gpu._backend.ws["lengths"])[0].copy_(torch.from_numpy(lengths))
    gpu._lengths[0] = cpu._lengths[0] = lengths
    rule = R.AlignmentRule(name="t", topk=topk, v_skip=14)
    q = rng.standard_normal((B, Hq, D)).astype(np.float16)
    backend = gpu._backend
    backend.fused_cluster = cluster
    results = []
    for fused in ("always", False):
        backend.fused = fused
        assert uses_fused(gpu, B) == bool(fused)
        gpu.reset_counters()
        for name in ("stats", "o_est"):
            torch.from_dlpack(backend.ws[name]).fill_(float("nan"))
        out = torch.full((B, Hq, D), float("nan"), dtype=torch.float16, device="cuda")
        _, info = gpu.attend(0, torch.from_numpy(q).cuda(), mode="aligned", rule=rule,
                             debug=True, count=True, out=out)
        results.append((out.cpu().numpy(), info))
    (o1, a), (o2, b2) = results
    assert np.isfinite(a["stats"]).all() and np.isfinite(a["o_est"]).all()
    for b in range(B):
        assert np.array_equal(a["k_tiers"][b], b2["k_tiers"][b])
    assert np.allclose(a["stats"][..., 0], b2["stats"][..., 0], rtol=1e-6, atol=1e-6)
    assert np.allclose(a["stats"][..., 1], b2["stats"][..., 1], rtol=1e-4)
    assert np.allclose(a["o_est"], b2["o_est"], rtol=1e-4, atol=1e-7)
    ca, cb = a["counters"], b2["counters"]
    for name in ("k_hi_bytes", "k_mid_bytes", "k_lo_bytes", "metadata_bytes", "values"):
        assert ca[name] == cb[name], name
    for name in ("v_hi_bytes", "v_mid_bytes", "v_lo_bytes"):
        assert abs(ca[name] - cb[name]) <= 1e-3 * max(cb[name], 1), name
    ref = cpu.attend(0, q, mode="aligned", rule=rule)
    assert R.relative_error(o1, ref) < 2e-3
    assert R.relative_error(o2, ref) < 2e-3
