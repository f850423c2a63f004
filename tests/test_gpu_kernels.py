"""GPU tests: the cubins against their numpy twins (skipped without a CUDA device)."""

import numpy as np
import pytest

from akv_runtime import reference as R
from akv_runtime.cache import AlignedKVCache
from akv_runtime.kernels import DECODE_VERSIONS
from akv_runtime.layout import BLOCK_TOKENS, PLANE_NAMES

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, params=DECODE_VERSIONS, ids=[f"v{v}" for v in DECODE_VERSIONS])
def decode_version(request, monkeypatch):
    """Every GPU test runs against every decode kernel version."""
    monkeypatch.setenv("AKV_DECODE_VERSION", str(request.param))
    return request.param


def kv_like(rng, B, Hk, S, D, outliers=True):
    """K with per-channel magnitudes spread over binary orders (a few large channels, as
    RoPE'd keys have), V with per-channel scales; fresh random values every call."""
    k_scale = np.exp2(rng.uniform(-3, 1, (1, Hk, 1, D)))
    if outliers:
        k_scale[..., rng.choice(D, 3, replace=False)] *= 16
    K = (rng.standard_normal((B, Hk, S, D)) * k_scale).astype(np.float16)
    V = (rng.standard_normal((B, Hk, S, D)) * np.exp2(rng.uniform(-2, 0, (1, Hk, 1, D))))
    return K, V.astype(np.float16)


def make_pair(rng, L, Hk, Hq, D, B, max_len, paged=False, fused=False, v_rule="always"):
    """A CUDA cache and a numpy cache of the same shape. ``fused``: the CUDA backend's choice
    of the one-launch fused kernel (False: the four launches of the decode version under
    test, which most tests here exercise; "always": the fused kernel wherever it serves).
    ``v_rule``: "always" (default) so that aligned calls of these small sizes run the V rule
    they test; the V-whole path has its own tests (test_decode_v_whole_*)."""
    bps = -(-max_len // BLOCK_TOKENS)
    table = None
    if paged:
        table = rng.permutation(B * bps + 3)[:B * bps].reshape(B, bps).astype(np.int32)
    kw = dict(num_query_heads=Hq, batch_size=B, block_table=table,
              num_blocks=(B * bps + 3) if paged else None, v_rule=v_rule)
    gpu = AlignedKVCache(L, Hk, D, max_len, backend="cuda", **kw)
    cpu = AlignedKVCache(L, Hk, D, max_len, backend="numpy", **kw)
    if fused and gpu._backend.k_fused is None:
        pytest.skip("the fused kernel needs compute capability 9.0 (thread-block clusters)")
    gpu._backend.fused = fused
    return gpu, cpu


def fused_once(decode_version, fused):
    """The fused kernel does not depend on the decode version: run its cases under one."""
    if fused and decode_version != 3:
        pytest.skip("the fused kernel is the same under every decode version (run under v3)")


def whole_kernel_once(decode_version, whole_kernel):
    """The V-whole path's flash and split kernels are the same under every decode version
    >= 3 (and versions 1-2 never run them): run their cases under version 7 only."""
    if whole_kernel != "three" and decode_version != 7:
        pytest.skip(f"the {whole_kernel} kernel is the same under every decode version "
                    "(run under v7)")


def uses_fused(gpu, B) -> bool:
    """Whether the CUDA cache's next decode call on layer 0 runs the fused kernel."""
    backend = gpu._backend
    nblk = -(-int(gpu._lengths[0].max()) // BLOCK_TOKENS)
    return backend._use_fused(nblk, gpu.num_kv_heads, B)


def append_both(gpu, cpu, layer, K, V):
    gpu.append(layer, torch.from_numpy(K).cuda(), torch.from_numpy(V).cuda())
    cpu.append(layer, K, V)


@pytest.mark.parametrize("D,Hk,Hq,paged", [(64, 3, 9, False), (128, 2, 2, True),
                                           (128, 8, 32, False), (64, 1, 8, True)])
def test_append_planes_match_reference_bytes(rng, D, Hk, Hq, paged):
    B, L = 2, 2
    gpu, cpu = make_pair(rng, L, Hk, Hq, D, B, 700, paged)
    # prefill of an odd length, single decode tokens across a block edge, then a chunk
    for S in (61, 1, 1, 1, 3, 130, 1):
        K, V = kv_like(rng, B, Hk, S, D)
        append_both(gpu, cpu, 1, K, V)
    torch.cuda.synchronize()
    host = gpu._backend.host_planes(1)
    ref = cpu._backend.layer_planes(1)
    for name in PLANE_NAMES:
        # only bytes of written tokens are defined; the reference starts from zeros like the
        # GPU buffers, so whole planes must agree
        assert np.array_equal(host[name], ref[name]), name
    for b in range(B):
        for tier in (8, 12, 16):
            kg, vg = gpu.read(1, b, tier)
            kc, vc = cpu.read(1, b, tier)
            assert np.array_equal(kg.view(np.uint16), kc.view(np.uint16))
            assert np.array_equal(vg.view(np.uint16), vc.view(np.uint16))
    assert np.array_equal(gpu.lengths(), cpu.lengths())
    # the kernel advanced the device lengths itself (its last CTA per sequence) and left its
    # arrival counts at zero for the next launch
    ws = gpu._backend.ws
    assert np.array_equal(torch.from_dlpack(ws["lengths"]).cpu().numpy(), cpu.lengths())
    assert not torch.from_dlpack(ws["append_arrive"]).cpu().numpy().any()


def test_strided_torch_input_is_read_in_place(rng):
    """HF lays K out as [B, S, Hk, D].transpose(1, 2): non-contiguous, read without copy."""
    B, Hk, D, S = 2, 4, 128, 100
    gpu, cpu = make_pair(rng, 1, Hk, Hk, D, B, 256)
    K, V = kv_like(rng, B, Hk, S, D)
    kt = torch.from_numpy(np.ascontiguousarray(K.transpose(0, 2, 1, 3))).cuda().transpose(1, 2)
    vt = torch.from_numpy(np.ascontiguousarray(V.transpose(0, 2, 1, 3))).cuda().transpose(1, 2)
    assert not kt.is_contiguous()
    gpu.append(0, kt, vt)
    cpu.append(0, K, V)
    for b in range(B):
        kg, vg = gpu.read(0, b)
        assert np.array_equal(kg.view(np.uint16), K[b].view(np.uint16))
        assert np.array_equal(vg.view(np.uint16), V[b].view(np.uint16))


def _fill(rng, gpu, cpu, B, Hk, D, n):
    """Prefill every sequence of layer 0 of both caches with the same n tokens."""
    K, V = kv_like(rng, B, Hk, n, D)
    append_both(gpu, cpu, 0, K, V)
    return K, V


@pytest.mark.parametrize("D,Hk,Hq,B,n,paged", [(128, 4, 4, 2, 1000, False),
                                                (64, 3, 9, 1, 2047, True),
                                                (128, 2, 8, 3, 300, False),
                                                (64, 2, 2, 2, 70, True),
                                                (128, 1, 8, 2, 400, False)])   # group 8
@pytest.mark.parametrize("split,fused", [(None, False), (3, False), (None, "always")],
                         ids=["auto", "split3", "fused"])
def test_decode_full_matches_fp16_attention(rng, decode_version, D, Hk, Hq, B, n, paged, split,
                                            fused):
    fused_once(decode_version, fused)
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n + 64, paged, fused)
    gpu._backend.forced_split = split       # None: one block per CTA at these sizes
    K, V = _fill(rng, gpu, cpu, B, Hk, D, n)
    assert uses_fused(gpu, B) == bool(fused)
    q = rng.standard_normal((B, Hq, D)).astype(np.float16)
    o = gpu.attend(0, torch.from_numpy(q).cuda(), mode="full").cpu().numpy()
    o_ref = cpu.attend(0, q, mode="full")
    for b in range(B):
        exact = R.float64_attention(q[b], K[b], V[b])
        err = R.relative_error(o[b], exact)
        assert err < 1e-3, err                 # fp32 accumulation + fp16 output rounding
        assert R.relative_error(o[b], o_ref[b]) < 1e-3
        # torch SDPA on the same fp16 K/V (GQA by repeating KV heads)
        Kt = torch.from_numpy(K[b]).cuda().repeat_interleave(Hq // Hk, 0)
        Vt = torch.from_numpy(V[b]).cuda().repeat_interleave(Hq // Hk, 0)
        qt = torch.from_numpy(q[b]).cuda()[:, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention(qt, Kt, Vt)[:, 0]
        assert R.relative_error(o[b], sdpa.float().cpu().numpy()) < 2e-3
    # a second call, into a given output, with another query: nothing of the first call's
    # workspace (scores, statistics, partials) shows through
    q2 = rng.standard_normal((B, Hq, D)).astype(np.float16)
    out = torch.full((B, Hq, D), float("nan"), dtype=torch.float16, device="cuda")
    gpu.attend(0, torch.from_numpy(q2).cuda(), mode="full", out=out)
    o2_ref = cpu.attend(0, q2, mode="full")
    assert R.relative_error(out.cpu().numpy(), o2_ref) < 1e-3


SKIPPING = R.AlignmentRule(name="skip-test", v_skip=8)    # aggressive: with the sharper
                                                           # queries below, many tokens skip


#: (head_dim, KV heads, query heads, batch, tokens, paged) of the aligned-decode checks
#: (check_aligned_call); tests/test_gpu_fused.py runs them through the fused kernel too.
ALIGNED_SHAPES = [(128, 4, 4, 2, 1500, False),
                  (64, 3, 9, 2, 2100, True),
                  (128, 8, 32, 1, 700, False),
                  (64, 2, 12, 1, 600, True),     # group 6
                  (128, 2, 4, 2, 900, True),     # group 2
                  (64, 1, 7, 1, 500, False),     # group 7
                  (128, 1, 5, 1, 650, False),    # group 5
                  # head_dim 64 at groups 2, 4, 5 and 8 (added when version 8 was the default there)
                  (64, 2, 4, 1, 600, False),
                  (64, 2, 8, 2, 830, True),
                  (64, 1, 5, 2, 450, True),
                  (64, 1, 8, 1, 700, False)]


@pytest.mark.parametrize("rule", [R.SEED_RULE, SKIPPING], ids=["seed", "v_skip"])
@pytest.mark.parametrize("D,Hk,Hq,B,n,paged", ALIGNED_SHAPES)
@pytest.mark.parametrize("split", [None, 3, 8, (13, 5)],
                         ids=["auto", "split3", "split8", "split13_5"])
def test_decode_aligned_tiers_and_output(rng, D, Hk, Hq, B, n, paged, rule, split):
    """Kernel tiers, statistics, counters and output against the reference. At these sizes
    the automatic split is mostly one block per CTA (version 8's scores kernel: four, one
    per warp); ``split`` forces CTAs over 3 or 8 blocks
    (8: the values split of the large benchmark shapes), or 13 blocks per scores CTA (their
    limit is 16; batch 1 x 16k runs 11) with 5 per values CTA, with partial last splits."""
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n, paged)
    gpu._backend.forced_split = split
    check_aligned_call(rng, gpu, cpu, D, Hk, Hq, B, n, rule)


def check_aligned_call(rng, gpu, cpu, D, Hk, Hq, B, n, rule):
    """Fill both caches with n tokens per sequence, attend once with debug and counters,
    and check tiers, statistics, O_est, counters and output against the reference."""
    K, V = _fill(rng, gpu, cpu, B, Hk, D, n)
    assert uses_fused(gpu, B) == bool(gpu._backend.fused)
    sharp = 4 if rule.v_skip is not None else 1          # peaked weights: the skip tier occurs
    q = (rng.standard_normal((B, Hq, D)) * np.exp2(rng.uniform(-2, 2, (1, 1, D))) * sharp
         ).astype(np.float16)
    gpu.reset_counters()
    o, info = gpu.attend(0, torch.from_numpy(q).cuda(), mode="aligned", count=True, debug=True,
                         rule=rule)
    o = o.cpu().numpy()
    ref = cpu.attend(0, q, mode="aligned", debug=True, rule=rule)[1]
    planes = cpu._backend.layer_planes(0)
    nblk = -(-n // BLOCK_TOKENS)
    counted = np.zeros(8, np.int64)
    skipped = 0
    for b in range(B):
        blocks = cpu.block_table[b, :nblk]
        # K tiers: an integer function of q and the exponent maxima -> exactly equal
        kt_ref = R.k_tiers(q[b], planes["k_exp_max"][blocks], rule)
        assert np.array_equal(info["k_tiers"][b], kt_ref)
        assert np.array_equal(info["k_tiers"][b], ref["k_tiers"][b])
        # scores and softmax statistics agree to fp32 rounding. Two fp32 sums of the same D
        # products in different orders differ by up to ~2·D·2^-24 of the sum of the
        # products' magnitudes (not of the result: a score near 0 from large terms of both
        # signs has a large relative error); 4e-6 of that sum is several sigma of the
        # typical sqrt(D)·2^-24, and a tier misread (2^-8 of a term) is far above it
        s_ref = ref["scores"][b]
        terms = np.einsum("gd,gtd->gt", np.abs(q[b].astype(np.float32)),
                          np.abs(K[b].astype(np.float32)).repeat(Hq // Hk, axis=0)) / np.sqrt(D)
        s_tol = 1e-5 + 1e-5 * np.abs(s_ref) + 4e-6 * terms
        assert (np.abs(info["scores"][b] - s_ref) <= s_tol).all()
        m, l = info["stats"][b, :, 0], info["stats"][b, :, 1]
        m_ref, l_ref = ref["stats"][b, :, 0], ref["stats"][b, :, 1]
        assert (np.abs(m - m_ref) <= s_tol.max(axis=1)).all()
        # l = sum exp(s - m): an absolute difference d in the exponents moves it by a factor
        # exp(d), so its tolerance follows the scores' own differences (large scores from
        # the sharp queries differ by ~1e-4 absolute at fp32 rounding)
        ds = (np.abs(info["scores"][b] - s_ref).max(axis=1) + np.abs(m - m_ref))
        assert (np.abs(l - l_ref) <= (1e-5 + np.expm1(ds)) * l_ref).all()
        assert np.allclose(info["o_est"][b], ref["o_est"][b],
                           rtol=1e-4 + 2 * np.expm1(ds.max()), atol=1e-7)
        # V tiers: the reference rule applied to the kernel's own scores, m, l and O_est
        # must give the kernel's tiers, except where exp() rounds across a power of two
        p = (np.exp(info["scores"][b] - m[:, None]) / l[:, None]).astype(np.float32)
        vt_ref = R.v_tiers(p, info["o_est"][b], planes["v_exp_max"][blocks], n, rule)
        diff = info["v_tiers"][b] != vt_ref
        if diff.any():
            frac = np.abs(np.log2(p) - np.round(np.log2(p)))
            near = (frac < 1e-5).reshape(Hk, Hq // Hk, n).any(axis=1)
            assert not (diff & ~near).any(), int((diff & ~near).sum())
        assert diff.mean() < 1e-3
        counted += R._count_bytes(info["k_tiers"][b], info["v_tiers"][b], n, Hq, nblk, D,
                                  rule)
        skipped += int((info["v_tiers"][b] == 0).sum())
        # the output against the reference's aligned output (same tiers, so the same
        # function up to fp32 summation order). How close the seed rule itself stays to
        # float64 is a property of the rule, not of the kernel: on these synthetic inputs it
        # ranged from 1x to 15x plain fp16's error (issue 5), so it is not asserted here.
        ref_o = cpu.attend(0, q, mode="aligned", rule=rule)[b]
        assert R.relative_error(o[b], ref_o) < 2e-3
    if rule.v_skip is not None:
        # the skip tier is exercised in this call, in some sequence (per sequence was too
        # strict: with AKV_TEST_SEED=1847914860077345505, 64 x 1 x 5, 2 x 450 tokens, the
        # reference skips 14 tokens of sequence 0 and none of sequence 1)
        assert skipped > 0
    # the kernel's counters equal the bytes implied by the tiers it used
    got = gpu.counters()
    names = ["k_hi_bytes", "k_mid_bytes", "k_lo_bytes", "v_hi_bytes", "v_mid_bytes",
             "v_lo_bytes", "metadata_bytes", "values"]
    assert [got[k] for k in names] == counted.tolist()
    # never more plane bytes than fp16 (K in whole 64-token blocks); the metadata comes on
    # top, so a large group whose heads want different channels can read more than 16 bits
    # per value in all (16.14 at G = 7, 500 tokens)
    assert sum(got[k] for k in names[:3]) <= 2 * B * nblk * BLOCK_TOKENS * D * Hk
    assert sum(got[k] for k in names[3:6]) <= 2 * got["values"]


@pytest.mark.parametrize("D,Hk,Hq,B,n,paged", [(128, 4, 4, 2, 1500, False),
                                                (64, 3, 9, 2, 2100, True),
                                                (128, 8, 32, 1, 700, False),
                                                (64, 1, 8, 1, 700, False),
                                                # groups 2, 5, 6 and 7
                                                (64, 2, 4, 2, 900, True),
                                                (128, 1, 5, 1, 1300, False),
                                                (128, 2, 12, 1, 900, True),
                                                (64, 1, 7, 2, 700, False)])
@pytest.mark.parametrize("split", [None, 3, (13, 5)], ids=["auto", "split3", "split13_5"])
@pytest.mark.parametrize("whole_kernel", ["flash", "split", "three"])
def test_decode_v_whole_matches_reference(rng, decode_version, D, Hk, Hq, B, n, paged, split,
                                          whole_kernel):
    """The V-whole path (v_rule "never", and "auto" at these sizes: K at its tiers, V at 16
    bits, no estimate; each values split normalised by its own statistics, merged by
    akv_decode_combine_rescale), through the flash kernel (akv_decode_flash_whole_v7_*), the
    split kernel (akv_decode_split_whole_v7_*) or the version's scores and values kernels:
    K tiers equal to the reference's, every V tier
    16, counters equal to the reference's (no estimate rows), outputs within fp32 rounding
    of the reference's and of float64 attention over the K the tiers read; a second call
    into a NaN-filled buffer shows nothing of the first."""
    whole_kernel_once(decode_version, whole_kernel)
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n + 64, paged, v_rule="never")
    gpu._backend.forced_split = split
    gpu._backend.whole_kernel = whole_kernel
    K, V = _fill(rng, gpu, cpu, B, Hk, D, n)
    q = (rng.standard_normal((B, Hq, D)) * np.exp2(rng.uniform(-2, 2, (1, 1, D)))
         ).astype(np.float16)
    for policy in ("never", "auto"):
        gpu.v_rule = cpu.v_rule = policy
        assert not gpu.v_rule_applies(0)
        gpu.reset_counters()
        cpu.reset_counters()
        o, info = gpu.attend(0, torch.from_numpy(q).cuda(), count=True, debug=True)
        o = o.cpu().numpy()
        o_ref, ref = cpu.attend(0, q, count=True, debug=True)
        assert gpu.counters() == cpu.counters()
        assert gpu.counters()["bits_per_value"]["v"] == 16.0  # V whole
        for b in range(B):
            assert np.array_equal(info["k_tiers"][b], ref["k_tiers"][b])
            assert (info["v_tiers"][b] == 16).all()
            assert R.relative_error(o[b], o_ref[b]) < 1e-3
        assert any((kt < 16).any() for kt in ref["k_tiers"])  # K was read at lower tiers
    out = torch.full((B, Hq, D), float("nan"), dtype=torch.float16, device="cuda")
    q2 = rng.standard_normal((B, Hq, D)).astype(np.float16)
    gpu.attend(0, torch.from_numpy(q2).cuda(), out=out)
    assert R.relative_error(out.cpu().numpy(), cpu.attend(0, q2)) < 1e-3


@pytest.mark.parametrize("D,Hk,Hq,B,n,paged", [(128, 4, 4, 2, 1500, False),
                                                (64, 3, 9, 2, 2100, True),
                                                (128, 8, 32, 1, 4096, False),
                                                (128, 2, 2, 3, 700, True),
                                                (64, 1, 8, 1, 700, False)])
@pytest.mark.parametrize("split", [1, 3, 8])
@pytest.mark.parametrize("mode", ["aligned", "full"])
@pytest.mark.parametrize("ragged", [False, True], ids=["even", "ragged"])
def test_split_kernel_equals_the_two_kernels_bit_for_bit(rng, decode_version, D, Hk, Hq, B, n,
                                                         paged, split, mode, ragged):
    """akv_decode_split_whole_v7_* (version 7's scores and V-whole values kernels in one
    CTA) against the same two kernels launched one after the other with the same split: the
    same output bits, counters, K and V tier maps and scores; also over a ragged batch,
    where a short sequence's CTAs past its blocks return from both phases. The flash kernel
    (akv_decode_flash_whole_v7_*, one pass) with the same split: the same tiers, scores and
    counters, and its output within fp32 rounding of the split kernel's."""
    if decode_version != 7:
        pytest.skip("the split kernel is version 7's two kernels (run under v7)")
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n + 64, paged, v_rule="never")
    gpu._backend.forced_split = split
    if ragged:      # the last sequence n tokens, the others fewer (the first a single one)
        lengths = [n if b == B - 1 else max(1, n * b // B) for b in range(B)]
        K, V = kv_like(rng, B, Hk, n, D)
        gpu.append(0, torch.from_numpy(K).cuda(), torch.from_numpy(V).cuda(), counts=lengths)
        assert gpu.lengths(0).tolist() == lengths
    else:
        _fill(rng, gpu, cpu, B, Hk, D, n)
    q = torch.from_numpy((rng.standard_normal((B, Hq, D)) *
                          np.exp2(rng.uniform(-2, 2, (1, 1, D)))).astype(np.float16)).cuda()
    runs = {}
    for whole_kernel in ("flash", "split", "three"):
        gpu._backend.whole_kernel = whole_kernel
        gpu.reset_counters()
        o, info = gpu.attend(0, q, mode=mode, count=True, debug=True)
        runs[whole_kernel] = (o.cpu().numpy(), info, gpu.counters())
    (o1, i1, c1), (o2, i2, c2) = runs["split"], runs["three"]
    assert np.array_equal(o1.view(np.uint16), o2.view(np.uint16))
    assert c1 == c2
    for key in ("k_tiers", "v_tiers", "scores"):
        for a, b in zip(i1[key], i2[key]):
            assert np.array_equal(a, b), key
    # the flash kernel (one pass, an online softmax): the same tiers, scores and counters,
    # the output within fp32 rounding (its weights are relative to a running maximum) of
    # the split kernel's and of the reference's
    o3, i3, c3 = runs["flash"]
    assert c3 == c1
    for key in ("k_tiers", "v_tiers", "scores"):
        for a, b in zip(i1[key], i3[key]):
            assert np.array_equal(a, b), key
    assert R.relative_error(o3, o1) < 1e-3
    o_ref = cpu.attend(0, q.cpu().numpy(), mode=mode) if not ragged else None
    if o_ref is not None:
        assert R.relative_error(o3, o_ref) < 1e-3


@pytest.mark.parametrize("D,Hk,Hq,B,n,paged", [(128, 8, 32, 2, 2100, True),
                                                (64, 3, 9, 3, 1500, False),
                                                (128, 1, 8, 2, 1200, False)])
@pytest.mark.parametrize("split", [None, 11, 16])
@pytest.mark.parametrize("mode", ["aligned", "full"])
def test_flash_kernel_long_splits_and_ragged_batches_match_reference(
        rng, decode_version, D, Hk, Hq, B, n, paged, split, mode):
    """The flash kernel (akv_decode_flash_whole_v7_*) with splits beyond the split kernel's
    8 blocks (up to kernels.MAX_FLASH_SPLIT_BLOCKS; one running maximum over up to 16
    blocks) over a ragged batch (the first sequence a single token): K tiers and counters
    equal to the reference's, every V tier 16, the scores and the output within fp32
    rounding of the reference's."""
    if decode_version != 7:
        pytest.skip("the flash kernel is the same under every decode version (run under v7)")
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n + 64, paged, v_rule="never")
    gpu._backend.forced_split = split
    gpu._backend.whole_kernel = "flash"               # the default
    lengths = [n if b == B - 1 else max(1, n * b // B) for b in range(B)]
    K, V = kv_like(rng, B, Hk, n, D)
    gpu.append(0, torch.from_numpy(K).cuda(), torch.from_numpy(V).cuda(), counts=lengths)
    cpu.append(0, K, V, counts=lengths)
    q = (rng.standard_normal((B, Hq, D)) * np.exp2(rng.uniform(-2, 2, (1, 1, D)))
         ).astype(np.float16)
    gpu.reset_counters()
    cpu.reset_counters()
    o, info = gpu.attend(0, torch.from_numpy(q).cuda(), mode=mode, count=True, debug=True)
    o_ref, ref = cpu.attend(0, q, mode=mode, count=True, debug=True)
    assert gpu.counters() == cpu.counters()
    o = o.cpu().numpy()
    for b in range(B):
        assert np.array_equal(info["k_tiers"][b], ref["k_tiers"][b])
        assert info["v_tiers"][b].shape == (Hk, lengths[b]) and (info["v_tiers"][b] == 16).all()
        # fp32 sums of the same products in another order (the tolerance of
        # test_decode_aligned_tiers_and_output)
        s_ref = ref["scores"][b]
        terms = np.einsum("gd,gtd->gt", np.abs(q[b].astype(np.float32)),
                          np.abs(K[b, :, :lengths[b]].astype(np.float32)).repeat(Hq // Hk, axis=0)
                          ) / np.sqrt(D)
        assert (np.abs(info["scores"][b] - s_ref) <= 1e-5 + 1e-5 * np.abs(s_ref) + 4e-6 * terms).all()
        assert R.relative_error(o[b], o_ref[b]) < 1e-3


@pytest.mark.parametrize("n", [70, 900, 4096, 5000, 70000])
def test_rescaling_combine_same_bits_for_one_or_four_threads_per_channel(rng, monkeypatch,
                                                                         decode_version, n):
    """akv_decode_combine_rescale gives the same bits with one thread per output channel or
    four (kernels.combine_chains): splits within the 16 each thread loads first, beyond
    them, and past one chunk of 1024 weights (70000 tokens at split 1), each against the
    reference."""
    if decode_version not in (3, 7):
        pytest.skip("the combine does not depend on the decode version (run under 3 and 7)")
    from akv_runtime import kernels
    D, Hk, Hq = 64, 1, 2
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, 1, n, v_rule="never")
    gpu._backend.forced_split = 1 if n == 70000 else None
    _fill(rng, gpu, cpu, 1, Hk, D, n)
    q = rng.standard_normal((1, Hq, D)).astype(np.float16)
    outs = {}
    for chains in (1, 4):
        monkeypatch.setattr(kernels, "combine_chains", lambda *a, c=chains: c)
        gpu._backend._plans.clear()
        outs[chains] = gpu.attend(0, torch.from_numpy(q).cuda()).cpu().numpy()
    assert np.array_equal(outs[1].view(np.uint16), outs[4].view(np.uint16))
    assert R.relative_error(outs[1], cpu.attend(0, q)) < 1e-3


@pytest.mark.parametrize("D,Hk,Hq", [(64, 3, 9), (128, 2, 8)])
@pytest.mark.parametrize("whole_kernel", ["flash", "split", "three"])
@pytest.mark.parametrize("split", [None, 5], ids=["auto", "split5"])
def test_decode_v_whole_follows_fp16_inf_and_nan(rng, decode_version, D, Hk, Hq, whole_kernel,
                                                 split):
    """Inf and NaN in V on the V-whole path (the flash kernel, the split kernel, or the
    version's scores and values kernels): a token of +Inf in a channel makes that channel's output +Inf
    (positive weights down to 2^-34, docs/design.md), NaN stays NaN, as in fp16 attention; K/V elsewhere
    finite."""
    whole_kernel_once(decode_version, whole_kernel)
    B, n = 1, 300
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n, v_rule="never")
    gpu._backend.whole_kernel = whole_kernel
    # split5: one CTA over all 5 blocks, so the flash kernel rescales accumulators that
    # hold the Inf and the NaN as its running maximum moves
    gpu._backend.forced_split = split
    K, V = kv_like(rng, B, Hk, n, D)
    V[0, 0, 17, 3] = np.inf
    V[0, Hk - 1, 250, 5] = np.nan
    append_both(gpu, cpu, 0, K, V)
    # mild scores (|s| < ~2): no weight underflows to 0, where 0 x Inf would be NaN (in the
    # reference and in fp16 attention alike)
    q = (rng.standard_normal((B, Hq, D)) * 0.05).astype(np.float16)
    o = gpu.attend(0, torch.from_numpy(q).cuda()).cpu().numpy()
    o_ref = cpu.attend(0, q)
    assert np.array_equal(np.isposinf(o), np.isposinf(o_ref))
    assert np.array_equal(np.isnan(o), np.isnan(o_ref))
    G = Hq // Hk
    assert np.isposinf(o[0, :G, 3]).all() and np.isposinf(o_ref[0, :G, 3]).all()
    assert np.isnan(o[0, -G:, 5]).all() and np.isnan(o_ref[0, -G:, 5]).all()
    finite = np.isfinite(o_ref)
    assert np.array_equal(np.isfinite(o), finite)
    assert R.relative_error(np.where(finite, o, 0), np.where(finite, o_ref, 0)) < 1e-3


@pytest.mark.parametrize("D,Hk,Hq", [(64, 3, 9), (128, 2, 8), (128, 4, 4)])
@pytest.mark.parametrize("split,fused", [(None, False), (3, False), (None, "always")],
                         ids=["auto", "split3", "fused"])
def test_decode_steps_across_split_boundaries(rng, decode_version, D, Hk, Hq, split, fused):
    """Decode steps (append one token, attend) whose block and split counts change between
    calls (6 blocks -> 7: with splits of 3, two splits -> three). Each step's output, written
    into a NaN-filled buffer, must be the reference's: nothing of an earlier call's
    workspace (partials of a split that no longer exists, statistics) shows through."""
    B, n0, steps = 2, 3 * 2 * BLOCK_TOKENS - 2, 5       # 6 blocks -> 7 (splits of 3: 2 -> 3)
    fused_once(decode_version, fused)
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n0 + steps, fused=fused)
    gpu._backend.forced_split = split
    _fill(rng, gpu, cpu, B, Hk, D, n0)
    out = torch.empty((B, Hq, D), dtype=torch.float16, device="cuda")
    for step in range(steps):
        K1, V1 = kv_like(rng, B, Hk, 1, D)
        append_both(gpu, cpu, 0, K1, V1)
        q = rng.standard_normal((B, Hq, D)).astype(np.float16)
        out.fill_(float("nan"))
        gpu.attend(0, torch.from_numpy(q).cuda(), mode="aligned", out=out)
        ref = cpu.attend(0, q, mode="aligned")
        assert R.relative_error(out.cpu().numpy(), ref) < 2e-3, (step, n0 + step + 1)


@pytest.mark.parametrize("D,Hk,Hq", [(64, 3, 9), (128, 2, 8), (128, 4, 4), (64, 1, 2),
                                     (128, 1, 8)])
@pytest.mark.parametrize("topk", [1, 5, 32, 64, 100])
def test_short_estimate_equals_the_long_kernel_bit_for_bit(rng, D, Hk, Hq, topk):
    """Up to 64 blocks per sequence the host may launch akv_decode_estimate_short (one warp
    per query head) instead of the 256-thread kernel (kernels._estimate_launch); its
    statistics, O_est, counters and so the whole call must be the same bits. Lengths from
    1 token (1 block) through 33 and 47 blocks (both halves of a lane's pair) to exactly
    64 in one batch (paged), tied block maxima (repeated K blocks) in two sequences, groups
    1 to 8, topk from 1 to above the block count; the output also against the reference."""
    B, n = 4, 64 * BLOCK_TOKENS
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n, paged=True)
    K, V = kv_like(rng, B, Hk, n, D)
    # sequences 2 and 3: whole K blocks repeated, so block maxima tie (V still differs)
    pick = rng.integers(0, 3, n // BLOCK_TOKENS)
    pat = K[2:, :, :3 * BLOCK_TOKENS].reshape(2, Hk, 3, BLOCK_TOKENS, D)
    K[2:] = pat[:, :, pick].reshape(2, Hk, n, D)
    append_both(gpu, cpu, 0, K, V)
    # then shorter sequences in the same batch: the tokens past a length are never read
    lengths = np.array([1, 2100, n, 3000], np.int32)     # 1, 33, 64 and 47 blocks
    torch.from_dlpack(gpu._backend.ws["lengths"])[0].copy_(torch.from_numpy(lengths))
    gpu._lengths[0] = cpu._lengths[0] = lengths
    rule = R.AlignmentRule(name="t", topk=topk, v_skip=14)
    q = rng.standard_normal((B, Hq, D)).astype(np.float16)
    backend = gpu._backend
    results = []
    for short in ("always", False):
        backend.short_estimate = short
        gpu.reset_counters()
        for name in ("stats", "o_est"):     # a kernel that wrote nothing would show NaN
            torch.from_dlpack(backend.ws[name]).fill_(float("nan"))
        o, info = gpu.attend(0, torch.from_numpy(q).cuda(), mode="aligned", rule=rule,
                             debug=True, count=True)
        results.append((o.cpu().numpy(), info))
    (o1, a), (o2, b2) = results
    assert np.isfinite(a["stats"]).all() and np.isfinite(a["o_est"]).all()
    assert np.array_equal(a["stats"].view(np.uint32), b2["stats"].view(np.uint32))
    assert np.array_equal(a["o_est"].view(np.uint32), b2["o_est"].view(np.uint32))
    assert a["counters"] == b2["counters"]
    assert np.array_equal(o1.view(np.uint16), o2.view(np.uint16))
    ref = cpu.attend(0, q, mode="aligned", rule=rule)
    assert R.relative_error(o1, ref) < 2e-3


@pytest.mark.parametrize("ties,blocks", [("distinct", 300), ("distinct", 600), ("tied", 300),
                                         ("tied", 600), ("all", 300), ("all", 1100)])
def test_estimate_over_long_sequences_matches_reference(rng, ties, blocks):
    """Above 64 blocks the estimate kernel finds the k-th largest block maximum by radix
    select before ranking the candidates; the decode tests above stay below 64 blocks. Here
    301, 601 and 1101 blocks per sequence. ``tied``: every block repeats one of five K
    patterns, so block maxima tie exactly (also at the k-th largest) while V differs, and
    only the reference's order
    (value, then lower block) gives its O_est. ``all``: every whole block is the same K
    block, so all but the last maxima tie: at 1101 blocks more candidates than the kernel's
    list holds (1024), and the rest count their rank alone."""
    B, Hk, Hq, D = 2, 1, 2, 64
    n = blocks * BLOCK_TOKENS + 17
    gpu, cpu = make_pair(rng, 1, Hk, Hq, D, B, n, paged=True)
    K, V = kv_like(rng, B, Hk, n, D)
    if ties != "distinct":
        nblk = -(-n // BLOCK_TOKENS)
        patterns = K[:, :, :5 * BLOCK_TOKENS].reshape(B, Hk, 5, BLOCK_TOKENS, D)
        pick = rng.integers(0, 5, nblk) if ties == "tied" else np.zeros(nblk, int)
        K = np.ascontiguousarray(patterns[:, :, pick].reshape(B, Hk, -1, D)[:, :, :n])
    append_both(gpu, cpu, 0, K, V)
    q = rng.standard_normal((B, Hq, D)).astype(np.float16)
    o, info = gpu.attend(0, torch.from_numpy(q).cuda(), mode="aligned", debug=True)
    o_ref, ref = cpu.attend(0, q, mode="aligned", debug=True)
    assert np.allclose(info["stats"][..., 0], ref["stats"][..., 0], rtol=1e-6, atol=1e-6)
    assert np.allclose(info["stats"][..., 1], ref["stats"][..., 1], rtol=1e-4)
    assert np.allclose(info["o_est"], ref["o_est"], rtol=1e-4, atol=1e-7)
    if ties != "distinct":   # the ties are real: several blocks share the 32nd-largest maximum
        nblk = -(-n // BLOCK_TOKENS)
        for b in range(B):
            padded = np.full((Hq, nblk * BLOCK_TOKENS), -np.inf, np.float32)
            padded[:, :n] = ref["scores"][b]
            bmax = padded.reshape(Hq, nblk, BLOCK_TOKENS).max(axis=-1)
            kth = np.sort(bmax, axis=-1)[:, -32]
            assert ((bmax == kth[:, None]).sum(axis=-1) > 1).all()
            if ties == "all" and blocks == 1100:    # past the kernel's candidate list
                assert ((bmax == kth[:, None]).sum(axis=-1) > 1024).all()
    assert R.relative_error(o.cpu().numpy(), o_ref) < 2e-3


def test_dlpack_exports_same_memory():
    gpu = AlignedKVCache(2, 2, 64, 128, backend="cuda")
    rng = np.random.default_rng()
    K, V = kv_like(rng, 1, 2, 70, 64)
    gpu.append(1, torch.from_numpy(K).cuda(), torch.from_numpy(V).cuda())
    for name in PLANE_NAMES:
        arr = gpu.plane(name, 1)
        t = torch.from_dlpack(arr)
        assert t.data_ptr() == arr.ptr
        assert t.dtype == torch.uint8 and tuple(t.shape) == gpu.layout.plane_shape(name)[1:]
        assert t.device.type == "cuda"
        assert np.array_equal(t.cpu().numpy(), gpu._backend.host_planes(1)[name])
    # a write through the torch view is seen by the cache (same memory)
    t = torch.from_dlpack(gpu.v_hi(1))
    t[0, 0, 0, 0] = 0x3C
    assert gpu._backend.host_planes(1)["v_hi"][0, 0, 0, 0] == 0x3C


def test_a_dlpack_view_outlives_close():
    """close() frees the buffers, except one a torch view still uses: the view keeps reading
    the planes, the closed cache refuses calls, and the memory goes with the last view."""
    import gc
    gpu = AlignedKVCache(1, 2, 64, 128, backend="cuda")
    K, V = kv_like(np.random.default_rng(), 1, 2, 70, 64)
    gpu.append(0, torch.from_numpy(K).cuda(), torch.from_numpy(V).cuda())
    expected = gpu._backend.host_planes(0)["k_hi"].copy()
    arr = gpu.k_hi(0)
    t = torch.from_dlpack(arr)
    buf = arr.owner
    assert buf.live_exports >= 1
    gpu.close()
    assert buf.ptr != 0 and buf.closing
    assert np.array_equal(t.cpu().numpy(), expected)
    with pytest.raises(ValueError, match="the cache is closed"):
        gpu.attend(0, torch.zeros(1, 2, 64, dtype=torch.float16, device="cuda"))
    del t
    gc.collect()
    assert buf.ptr == 0 and buf.live_exports == 0


@pytest.mark.parametrize("fused", [False, "always"], ids=["four", "fused"])
def test_launch_on_non_default_stream(rng, decode_version, fused):
    fused_once(decode_version, fused)
    D, Hk = 64, 2
    gpu, cpu = make_pair(rng, 1, Hk, Hk, D, 1, 256, fused=fused)
    K, V = kv_like(rng, 1, Hk, 200, D)
    q = rng.standard_normal((1, Hk, D)).astype(np.float16)
    side = torch.cuda.Stream()
    kt, vt, qt = (torch.from_numpy(x).cuda() for x in (K, V, q))
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        gpu.append(0, kt, vt)                  # torch's current stream is `side`
        o = gpu.attend(0, qt, mode="full")
    side.synchronize()
    cpu.append(0, K, V)
    assert R.relative_error(o.cpu().numpy(), cpu.attend(0, q, mode="full")) < 1e-3
    # explicit stream argument, output buffer given: nothing allocated
    out = torch.empty_like(qt)
    with torch.cuda.stream(side):
        gpu.attend(0, qt, mode="aligned", out=out, stream=side.cuda_stream)
    side.synchronize()
    assert R.relative_error(out.cpu().numpy(), cpu.attend(0, q)) < 2e-3


@pytest.mark.parametrize("fused", [False, "always"], ids=["four", "fused"])
def test_inf_and_nan_survive_every_tier(rng, decode_version, fused):
    fused_once(decode_version, fused)
    D, Hk = 64, 1
    gpu, cpu = make_pair(rng, 1, Hk, Hk, D, 1, 128, fused=fused)
    K, V = kv_like(rng, 1, Hk, 100, D)
    K[0, 0, 5, 3] = np.inf
    V[0, 0, 7, 2] = -np.inf
    V[0, 0, 9, 1] = np.float16(np.nan)
    append_both(gpu, cpu, 0, K, V)
    for tier in (8, 12):
        kg, vg = gpu.read(0, 0, tier)
        assert np.isposinf(kg[0, 5, 3]) and np.isneginf(vg[0, 7, 2]) and np.isnan(vg[0, 9, 1])
    q = rng.standard_normal((1, Hk, D)).astype(np.float16)
    o = gpu.attend(0, torch.from_numpy(q).cuda()).cpu().numpy()
    o_full = gpu.attend(0, torch.from_numpy(q).cuda(), mode="full").cpu().numpy()
    # fp16 semantics: the NaN in V poisons channel 1 in both modes, identically
    assert np.array_equal(np.isnan(o), np.isnan(o_full))


def test_bad_input_raises_before_launch(rng):
    gpu = AlignedKVCache(1, 2, 64, 128, backend="cuda")
    K, V = kv_like(rng, 1, 2, 10, 64)
    with pytest.raises(ValueError, match="host arrays|device arrays"):
        gpu.append(0, K, V)                     # numpy arrays on a CUDA cache
    with pytest.raises(TypeError, match="float16"):
        gpu.append(0, torch.zeros(1, 2, 10, 64, device="cuda"), torch.zeros(1, 2, 10, 64, device="cuda"))
    assert gpu.lengths().sum() == 0
