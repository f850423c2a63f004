"""CPU tests of the numpy reference: bit planes, the tier rule, attention."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from akv_runtime import reference as R
from akv_runtime.layout import BLOCK_TOKENS, PLANE_NAMES, PlaneLayout, identity_block_table

bits16 = arrays(np.uint16, st.integers(1, 300), elements=st.integers(0, 0xFFFF))


@given(bits16)
def test_split_join_round_trip_at_16_bits(bits):
    x = bits.view(np.float16)
    hi, mid, lo = R.split_planes(x)
    assert np.array_equal(R.join_planes(hi, mid, lo, 16).view(np.uint16), bits)


@given(arrays(np.uint8, st.integers(1, 64).map(lambda n: 2 * n), elements=st.integers(0, 15)))
def test_nibble_pack_round_trip(nibbles):
    packed = R.pack_nibbles(nibbles[0::2], nibbles[1::2])
    assert packed.shape[0] == nibbles.shape[0] // 2
    assert np.array_equal(R.unpack_nibbles(packed), nibbles)


@given(bits16)
def test_truncated_tiers_keep_specials_and_bound_the_error(bits):
    x = bits.view(np.float16)
    hi, mid, lo = R.split_planes(x)
    finite = np.isfinite(x)
    e = R.exponent_field16(bits).astype(np.int64) - 15        # unbiased, subnormal -> -14
    for tier, ulp_bits in ((8, 2), (12, 6)):
        t = R.join_planes(hi, mid, lo, tier)
        # Inf stays Inf, NaN whose payload lies in the hi byte stays NaN, signs kept; a NaN
        # with its payload in the dropped bits reads as Inf of its sign (the decode kernels
        # read any block-channel holding exponent 31 at 16 bits, so never see that)
        nan = np.isnan(x)
        assert np.array_equal(np.isposinf(t)[~nan], np.isposinf(x)[~nan])
        assert np.array_equal(np.isneginf(t)[~nan], np.isneginf(x)[~nan])
        kept_payload = ((hi & 3) != 0) | ((mid != 0) if tier == 12 else False)
        assert np.all(np.isnan(t)[nan & kept_payload])
        assert np.all(np.isinf(t)[nan & ~kept_payload])
        # midpoint refill: error at most half an ulp of the kept mantissa
        err = np.abs(t[finite].astype(np.float64) - x[finite].astype(np.float64))
        assert np.all(err <= np.exp2(e[finite] - ulp_bits - 1) + 0.0)
        # the hi byte (sign and exponent) is never changed
        assert np.array_equal(R.split_planes(t)[0], hi)


def _fresh_planes(L, B, Hk, D, max_len):
    bps = -(-max_len // BLOCK_TOKENS)
    layout = PlaneLayout(L, B * bps, Hk, D)
    planes = {n: np.zeros(layout.plane_shape(n)[1:], np.uint8) for n in PLANE_NAMES}
    return planes, identity_block_table(B, bps)


def _kv(rng, B, Hk, S, D):
    scale = np.exp2(rng.uniform(-4, 2, (1, Hk, 1, D)))
    K = (rng.standard_normal((B, Hk, S, D)) * scale).astype(np.float16)
    V = (rng.standard_normal((B, Hk, S, D)) * np.exp2(rng.uniform(-2, 0, (1, Hk, 1, D))))
    return K, V.astype(np.float16)


def test_append_in_pieces_equals_one_append(rng):
    """Writes into a half-filled block keep the neighbouring token of each shared byte."""
    B, Hk, D, n = 2, 2, 64, 333
    K, V = _kv(rng, B, Hk, n, D)
    one, table = _fresh_planes(1, B, Hk, D, 400)
    R.append_tokens(one, table, np.zeros(B, int), K, V)
    pieces, _ = _fresh_planes(1, B, Hk, D, 400)
    start = 0
    cuts = sorted(set(rng.integers(1, n, 12).tolist())) + [n]
    for end in cuts:
        R.append_tokens(pieces, table, np.full(B, start), K[:, :, start:end], V[:, :, start:end])
        start = end
    for name in PLANE_NAMES:
        assert np.array_equal(one[name], pieces[name]), name
    for b in range(B):
        k, v = R.read_sequence(pieces, table[b], n, 16)
        assert np.array_equal(k.view(np.uint16), K[b].view(np.uint16))
        assert np.array_equal(v.view(np.uint16), V[b].view(np.uint16))
    # exponent maxima equal the brute-force maxima per block and channel
    E = R.exponent_field16(K.view(np.uint16))
    for blk in range(-(-n // BLOCK_TOKENS)):
        expect = E[0, :, blk * 64:(blk + 1) * 64].max(axis=1)
        assert np.array_equal(pieces["k_exp_max"][table[0, blk]], expect)


def test_k_tiers_bound_every_product_error(rng):
    """Brute force over real values: every product q_i·k_ji read at the chosen tier is off by
    at most 2^-10 of the block's largest product (DESIGN.md section 4 with thresholds 8/4)."""
    Hk, G, D, nblk = 2, 3, 64, 6
    K, _ = _kv(rng, 1, Hk, nblk * 64, D)
    q = (rng.standard_normal((Hk * G, D)) * np.exp2(rng.uniform(-6, 3, D))).astype(np.float16)
    planes, table = _fresh_planes(1, 1, Hk, D, nblk * 64)
    R.append_tokens(planes, table, [0], K, K)
    kexp = planes["k_exp_max"][table[0]]
    tiers = R.k_tiers(q, kexp)                                      # [Hk, nblk, D]
    assert (tiers == 8).any() and (tiers == 16).any()               # the rule does something
    for t in (8, 12, 16):
        Kt, _ = R.read_sequence(planes, table[0], nblk * 64, t)
        for h in range(Hk):
            for blk in range(nblk):
                sl = slice(blk * 64, (blk + 1) * 64)
                exact = K[0, h, sl].astype(np.float64)              # [64, D]
                err = np.abs(Kt[h, sl].astype(np.float64) - exact)
                for g in range(G):
                    qg = np.abs(q[h * G + g].astype(np.float64))
                    biggest = (qg * np.abs(exact)).max()
                    at_tier = tiers[h, blk] == t
                    worst = (qg[at_tier] * err[:, at_tier]).max(initial=0.0)
                    assert worst <= biggest * 2.0 ** -10, (t, h, blk, g)


def test_v_tiers_bound_every_term_error(rng):
    """Brute force: each term p_j·v_jd read at the chosen tier is off by at most 2^-10 of
    |O_est_d| (DESIGN.md section 4, V side, thresholds 8/4, bias 0)."""
    Hk, G, D, n = 1, 2, 64, 500
    K, V = _kv(rng, 1, Hk, n, D)
    planes, table = _fresh_planes(1, 1, Hk, D, n)
    R.append_tokens(planes, table, [0], K, V)
    q = (4 * rng.standard_normal((1, Hk * G, D))).astype(np.float16)   # peaked weights
    res = R.decode_attention(planes, q, table, [n], "aligned", keep_debug=True)
    vt, p, o_est = res.v_tiers[0], res.weights[0], res.o_est[0]
    assert (vt == 8).any()
    exact = V[0].astype(np.float64)
    for t in (8, 12):
        _, Vt = R.read_sequence(planes, table[0], n, t)
        err = np.abs(Vt.astype(np.float64) - exact)                   # [Hk, n, D]
        for hq in range(Hk * G):
            h = hq // G
            sel = vt[h] == t
            term = p[hq, sel, None].astype(np.float64) * err[h, sel]
            assert np.all(term <= np.abs(o_est[hq]) * 2.0 ** -10 + 1e-30)


def test_full_mode_matches_float64_attention(rng):
    B, Hk, G, D, n = 2, 3, 3, 64, 777
    K, V = _kv(rng, B, Hk, n, D)
    planes, table = _fresh_planes(1, B, Hk, D, n)
    R.append_tokens(planes, table, np.zeros(B, int), K, V)
    q = rng.standard_normal((B, Hk * G, D)).astype(np.float16)
    full = R.decode_attention(planes, q, table, [n, n], "full")
    aligned = R.decode_attention(planes, q, table, [n, n], "aligned")
    for b in range(B):
        exact = R.float64_attention(q[b], K[b], V[b])
        assert R.relative_error(full.output[b], exact) < 5e-4
        fp16 = R.fp16_attention(q[b], K[b], V[b])
        assert R.relative_error(aligned.output[b], exact) < 4 * R.relative_error(fp16, exact)
    bits_full = R.bits_per_value(full.counters)
    bits_aligned = R.bits_per_value(aligned.counters)
    assert bits_full["v"] == 16.0
    assert bits_aligned["total"] < bits_full["total"]


def test_estimate_blocks_order_and_ties():
    bmax = np.array([1.0, 3.0, 3.0, -1.0, 2.0], np.float32)
    assert R.estimate_blocks(bmax, 3).tolist() == [1, 2, 4]
    assert R.estimate_blocks(bmax, 10).tolist() == [1, 2, 4, 0, 3]


def test_rule_validation():
    with pytest.raises(ValueError, match="k_thresholds"):
        R.AlignmentRule(k_thresholds=(2, 4))
    with pytest.raises(ValueError, match="topk"):
        R.AlignmentRule(topk=0)
    with pytest.raises(ValueError, match="mode"):
        R.decode_attention({}, np.zeros((1, 1, 64), np.float16), [[0]], [1], mode="fast")
    # every field is an int32 kernel argument: no floats or strings that the reference and
    # the kernels would read differently; lists become tuples (rules are hashable)
    for bad in (dict(k_thresholds=(8.9, 4)), dict(topk="32"), dict(v_skip=9.7),
                dict(v_bias="x"), dict(k_thresholds=(9,)), dict(v_thresholds=None),
                dict(name=3), dict(topk=True)):
        with pytest.raises(TypeError, match=next(iter(bad))):
            R.AlignmentRule(**bad)
    with pytest.raises(ValueError, match="v_skip"):
        R.AlignmentRule(v_skip=3)
    rule = R.AlignmentRule(k_thresholds=[9, 5], v_skip=np.int64(14))
    assert rule.k_thresholds == (9, 5) and type(rule.v_skip) is int and hash(rule)
    assert R.named_rule("tuned") is R.TUNED_RULE and R.RULES["seed"] is R.SEED_RULE
    with pytest.raises(KeyError, match="named rules: seed, tuned, precise"):
        R.named_rule("nope")
    with pytest.raises(ValueError, match="rule: unknown named rule 'nope'"):   # a ValueError
        R.named_rule("nope")
    with pytest.raises(ValueError, match="rule: unknown named rule"):
        R.named_rule(["seed"])


SKIP_RULE = R.AlignmentRule(name="skipping", v_skip=8)   # aggressive: the skip tier is used


@pytest.mark.parametrize("Hq,Hk,D,n,mode,rule", [(9, 3, 64, 150, "aligned", R.SEED_RULE),
                                                (4, 4, 128, 70, "aligned", R.SEED_RULE),
                                                (6, 2, 64, 130, "full", R.SEED_RULE),
                                                (9, 3, 64, 200, "aligned", SKIP_RULE)])
def test_causal_decode_attention_equals_decode_steps(rng, Hq, Hk, D, n, mode, rule):
    """Teacher forcing in one call equals N decode steps through the cache, position by
    position: same tiers, same fp16 outputs, same byte counters (tokens appended one by one,
    so the block being filled has running exponent maxima). One Inf in K and V."""
    from akv_runtime.workload import synthetic_kv, synthetic_q
    K, V = synthetic_kv(rng, 1, Hk, n, D, 0.5)
    K, V = K[0], V[0]
    K[0, 100 % n, 3] = np.inf
    V[-1, n // 2, 5] = -np.inf
    q = np.concatenate([synthetic_q(rng, 1, Hq, D, 0.5, num_kv_heads=Hk)[0][:, None]
                        for _ in range(n)], axis=1)                      # [Hq, n, D]
    res = R.causal_decode_attention(q, K, V, mode=mode, keep_debug=True, rule=rule)
    planes, table = _fresh_planes(1, 1, Hk, D, n)
    counters = np.zeros_like(res.counters)
    for t in range(n):
        R.append_tokens(planes, table, [t], K[None, :, t:t + 1], V[None, :, t:t + 1])
        step = R.decode_attention(planes, q[None, :, t], table, [t + 1], mode=mode,
                                  keep_debug=True, rule=rule)
        assert np.array_equal(step.k_tiers[0], res.k_tiers[t]), t
        assert np.array_equal(step.v_tiers[0], res.v_tiers[t]), t
        np.testing.assert_array_equal(step.output[0].view(np.uint16),
                                      res.output[:, t].view(np.uint16))
        counters += step.counters
    np.testing.assert_array_equal(counters, res.counters)
    assert mode == "full" or (res.counters[2] < res.counters[0] // 2)   # the rule truncated
    if rule.v_skip is not None:                   # the skip tier occurred, budget included
        assert any((vt == 0).any() for vt in res.v_tiers)


def test_skip_budget_matches_the_kernels_formula():
    """reference.skip_budget == ((ceil(log2 n)) + 1) // 2 as the kernels compute it."""
    for n in list(range(1, 300)) + [4095, 4096, 4097, 32768, 131072, 1 << 20]:
        assert int(R.skip_budget(n)) == ((n - 1).bit_length() + 1) // 2, n


def test_causal_decode_attention_rejects_bad_input():
    q = np.zeros((4, 10, 64), np.float16)
    K = np.zeros((2, 10, 64), np.float16)
    with pytest.raises(TypeError, match="q: expected float16"):
        R.causal_decode_attention(q.astype(np.float32), K, K)
    with pytest.raises(ValueError, match="K, V"):
        R.causal_decode_attention(q, K, K[:, :9])
    with pytest.raises(ValueError, match="multiple"):
        R.causal_decode_attention(q[:3], K, K)
    with pytest.raises(ValueError, match="mode"):
        R.causal_decode_attention(q, K, K, mode="fast")
    with pytest.raises(TypeError, match="rule"):
        R.causal_decode_attention(q, K, K, rule="tuned")
    with pytest.raises(ValueError, match="head_dim"):
        R.causal_decode_attention(q[..., :7], K[..., :7], K[..., :7])
    with pytest.raises(ValueError, match="no positions"):
        R.causal_decode_attention(q[:, :0], K[:, :0], K[:, :0])


def test_mma_weight_terms_carry_the_weight_to_21_bits(rng):
    """The tensor-core values kernels' weights (versions 5/6): hi + lo within 2^-21 p + 2^-35."""
    p = np.concatenate([rng.uniform(0, 1, 4000), np.exp2(rng.uniform(-40, 0, 4000)),
                        [0.0, 1.0, 0.5, 2.0 ** -24, 2.0 ** -30, 1 - 2.0 ** -20]]
                       ).astype(np.float32)
    hi, lo = R.mma_weight_terms(p)
    assert hi.dtype == lo.dtype == np.float16
    x = p.astype(np.float64) * R.MMA_WEIGHT_SCALE
    assert np.all(lo >= 0) and np.all(hi.astype(np.float64) <= x)     # hi rounds toward zero
    got = (hi.astype(np.float64) + lo.astype(np.float64)) / R.MMA_WEIGHT_SCALE
    err = np.abs(got - p.astype(np.float64))
    assert np.all(err <= 2.0 ** -21 * p + 2.0 ** -35)
    # one fp16 (flash-style P) would be ~2^-11 relative: the split is what keeps fp32 weights
    single = x.astype(np.float16).astype(np.float64) / R.MMA_WEIGHT_SCALE
    assert np.max(np.abs(single - p)[p > 1e-3] / p[p > 1e-3]) > 2.0 ** -13
    # p = 1 and powers of two are exact in hi alone: lo = 0, except in special blocks
    hi1, lo1 = R.mma_weight_terms(np.float32([1.0, 0.0]))
    assert hi1[0] == 1024 and lo1[0] == 0
    hs, ls = R.mma_weight_terms(np.float32([1.0, 0.0]), special=True)
    assert ls[0] == np.float16(2.0 ** -24) and ls[1] == 0 and hs[1] == 0
    with pytest.raises(ValueError, match="weights"):
        R.mma_weight_terms(np.float32([1.5]))
    with pytest.raises(ValueError, match="weights"):
        R.mma_weight_terms(np.float32([np.nan]))


def _two_pass_case(rng, n=700, Hk=2, G=2, D=64):
    """A paged-free cache of one sequence with a few blocks that attract the query."""
    K = (rng.standard_normal((Hk, n, D)) * np.exp2(rng.uniform(-2, 1, (1, 1, D))))
    V = rng.standard_normal((Hk, n, D))
    q = rng.standard_normal((Hk * G, D)) * 1.5
    hot = rng.choice(n, 3, replace=False)
    K[:, hot] += 2.0 * q.reshape(Hk, G, D).mean(axis=1)[:, None]      # peaked weights
    return q.astype(np.float16), K.astype(np.float16), V.astype(np.float16)


def _planes_of(K, V):
    Hk, n, D = K.shape
    nblk = -(-n // 64)
    layout = PlaneLayout(1, nblk, Hk, D)
    planes = {name: np.zeros(layout.plane_shape(name)[1:], np.uint8) for name in PLANE_NAMES}
    table = np.arange(nblk, dtype=np.int32)[None]
    R.append_tokens(planes, table, np.zeros(1, np.int64), K[None], V[None])
    return planes, table


def test_two_pass_shift_is_a_true_bound_on_block_weights(rng):
    """k_weight_shift(margin 0) = w_b: no weight of block b exceeds 2^-w_b of the row's
    largest, with weights from the full-precision K (the pass-1 bound is sound)."""
    q, K, V = _two_pass_case(rng)
    Hk, n, D = K.shape
    planes, table = _planes_of(K, V)
    nblk = -(-n // 64)
    kexp = planes["k_exp_max"][:nblk]
    kh, km, kl = R._gather_k(planes, np.arange(nblk))
    K8 = R.join_planes(kh, km, kl, 8).astype(np.float32).transpose(1, 0, 3, 2).reshape(
        Hk, nblk * 64, D)
    scale = 1 / np.sqrt(D)
    w = R.k_weight_shift(q, K8, kexp, n, scale, 0)               # [Hk, G, nblk]
    s = np.einsum("hgd,hjd->hgj", q.astype(np.float64).reshape(Hk, -1, D),
                  K.astype(np.float64)) * scale
    s = np.pad(s, ((0, 0), (0, 0), (0, nblk * 64 - n)), constant_values=-np.inf)
    bmax = s.reshape(Hk, -1, nblk, 64).max(axis=-1)
    log2_ratio = (bmax - bmax.max(axis=-1, keepdims=True)) / np.log(2)
    assert np.all(log2_ratio <= -w + 1e-9)
    assert (w > 0).any() and (w == 0).any()          # the case has far and near blocks
    # a margin subtracts, never below zero
    w3 = R.k_weight_shift(q, K8, kexp, n, scale, 3)
    assert np.array_equal(w3, np.maximum(0, w - 3))
    # the statistical bound (k_weight_z) is tighter: larger shifts, mostly
    wz = R.k_weight_shift(q, K8, kexp, n, scale, 0, z=2)
    assert (wz > w).sum() > (wz < w).sum()


def test_two_pass_lowers_far_blocks_and_counts_the_hi_reread(rng):
    q, K, V = _two_pass_case(rng)
    Hk, n, D = K.shape
    planes, table = _planes_of(K, V)
    lengths = np.array([n])
    single = R.AlignmentRule(k_thresholds=(11, 7))
    loose = R.AlignmentRule(k_thresholds=(11, 7), k_weight_margin=64)   # never shifts here
    tight = R.AlignmentRule(k_thresholds=(11, 7), k_weight_margin=2)
    r1 = R.decode_attention(planes, q[None], table, lengths, rule=single, keep_debug=True)
    r64 = R.decode_attention(planes, q[None], table, lengths, rule=loose, keep_debug=True)
    r2 = R.decode_attention(planes, q[None], table, lengths, rule=tight, keep_debug=True)
    kt1, kt2 = r1.k_tiers[0], r2.k_tiers[0]
    # margin 64: the single-pass tiers and output, plus pass 2's hi re-read in the counter
    assert np.array_equal(r64.k_tiers[0], kt1) and np.array_equal(r64.output, r1.output)
    extra = r64.counters - r1.counters
    assert extra[0] == 64 * int((kt1 >= 12).sum()) and not extra[1:].any()
    # margin 2: never more bits than the single pass, fewer on the far blocks
    assert np.all(kt2 <= kt1) and (kt2 < kt1).any()
    assert r2.counters[1] < r1.counters[1]
    # the error stays near the single pass's (weights of lowered blocks are small)
    exact = R.float64_attention(q, K, V)
    e1 = R.relative_error(r1.output[0], exact)
    e2 = R.relative_error(r2.output[0], exact)
    assert e2 < 2 * e1 + 1e-4


def test_two_pass_is_refused_where_it_does_not_exist():
    rule = R.AlignmentRule(k_weight_margin=4)
    q = np.zeros((2, 70, 64), np.float16)
    with pytest.raises(NotImplementedError, match="k_weight_margin"):
        R.causal_decode_attention(q, q, q, rule=rule)
    from akv_runtime.cache import _check_rule_backend
    with pytest.raises(NotImplementedError, match="CUDA kernels do not implement it"):
        _check_rule_backend(rule, "cuda")
    _check_rule_backend(rule, "numpy")
    with pytest.raises(ValueError, match="k_weight_margin"):
        R.AlignmentRule(k_weight_margin=-1)
    with pytest.raises(TypeError, match="k_weight_margin"):
        R.AlignmentRule(k_weight_margin=2.5)
    with pytest.raises(ValueError, match="k_weight_z"):
        R.AlignmentRule(k_weight_z=2)                   # needs k_weight_margin
    assert R.AlignmentRule(k_weight_margin=2, k_weight_z=2).k_weight_z == 2


@pytest.mark.parametrize("v_whole", [False, True])
def test_a_block_of_minus_inf_scores_weighs_nothing(v_whole):
    """K holding +Inf in one channel for a whole 64-token block, queried with q < 0 there:
    those scores are -inf and weigh 0, as in fp16 attention and float64 (no NaN from
    exp(-inf - -inf) in the block's sum), with the V rule and with V read whole.
    (akv_decode_values_whole_* select p = 0 for such a split for the same reason.)"""
    from akv_runtime.layout import PlaneLayout
    rng = np.random.default_rng(5)
    Hk, Hq, D, n = 1, 2, 64, 200
    K = rng.standard_normal((Hk, n, D)).astype(np.float16)
    V = rng.standard_normal((Hk, n, D)).astype(np.float16)
    K[:, 64:128, 0] = np.inf
    q = rng.standard_normal((1, Hq, D)).astype(np.float16)
    q[..., 0] = -1
    layout = PlaneLayout(1, 4, Hk, D)
    planes = {name: np.zeros(layout.plane_shape(name)[1:], np.uint8) for name in PLANE_NAMES}
    table = np.arange(4, dtype=np.int32)[None]
    R.append_tokens(planes, table, [0], K[None], V[None])
    res = R.decode_attention(planes, q, table, [n], "aligned", R.TUNED_RULE, v_whole=v_whole)
    exact = R.float64_attention(q[0], K, V)
    assert np.isfinite(res.output).all()
    assert R.relative_error(res.output[0], exact) < 5e-3
