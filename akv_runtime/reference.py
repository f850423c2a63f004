"""numpy twin of every kernel: the CPU backend and the oracle of the tests.

Each function here states, in array code, what one CUDA kernel in ``cuda/akv.cu`` computes:

=================================  ================================================
numpy                              CUDA entry point
=================================  ================================================
:func:`append_tokens`              ``akv_append``
:func:`read_sequence`              (a plane read at a tier; used by tests)
:func:`k_tiers`                    phase 1 of ``akv_decode_scores``
:func:`v_tiers`                    ``akv_decode_values`` tier decision
:func:`decode_attention`           ``akv_decode_scores`` → ``akv_decode_estimate``
                                   → ``akv_decode_values`` → ``akv_decode_combine``;
                                   with ``v_whole`` (and in full mode) the V-whole
                                   path: ``akv_decode_flash_whole`` (or
                                   ``akv_decode_split_whole``, or
                                   ``akv_decode_scores`` →
                                   ``akv_decode_values_whole``) →
                                   ``akv_decode_combine_rescale``
:func:`causal_decode_attention`    the same kernels at every position of a sequence
                                   (teacher forcing, for perplexity), the V rule on
                                   every call (a cache under ``v_rule="always"``)
:func:`mma_weight_terms`           the weights of ``akv_decode_values_v5/v6`` as
                                   the two fp16 columns of their tensor-core mma
=================================  ================================================

Tier decisions are integer functions of exactly representable inputs, so the reference's
tiers equal the kernel's. The reference forms dot products and the output sum in float64
(rounded to fp32 / fp16 where the kernel stores), so it is slightly more precise than the
kernels' fp32 accumulation; the tests compare the two within that rounding. The precision
alignment rule is DESIGN.md section 4 (AlignedKV, Tan et al., arXiv 2409.16546, section 3).
This module depends on :mod:`akv_runtime.layout` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .layout import (BLOCK_TOKENS, COUNTER_NAMES, FP16_SPECIAL_EXPONENT, blocks_for,
                     k_bytes_per_channel_block, v_bytes_per_token)

# ----------------------------------------------------------------------------- rules

#: The kernels' ``v_skip`` argument when a rule never skips a V token.
NEVER_SKIP = 1 << 20


@dataclass(frozen=True)
class AlignmentRule:
    """A precision-alignment rule: how a gap in exponents becomes a tier.

    A value whose largest possible contribution lies ``gap`` binary orders below the
    reference magnitude is read at tier 8 when ``gap >= thresholds[0]``, at tier 12 when
    ``gap >= thresholds[1]``, else at tier 16 (DESIGN.md section 4).

    Parameters
    ----------
    name : str
        Name shown in reports.
    k_thresholds, v_thresholds : (int, int)
        Gaps for tier 8 and tier 12 on the K and V side.
    topk : int
        Blocks whose maximum-weight token enters the V-side output estimate
        (the "approximate top-k" of DESIGN.md section 4).
    v_bias : int
        Added to the V-side reference exponent ``r`` (binary orders).
    v_skip : int or None
        V-side gap at which a token is not read at all (tier 0): its bound ``p·|v|`` lies
        ``v_skip + skip_budget(n)`` binary orders below the output estimate, so that up to
        ``n`` skipped terms of random sign stay ``v_skip`` orders below it (:func:`skip_budget`,
        docs/design.md); ``None`` never skips (the seed).
    k_weight_margin : int or None
        **Design study, numpy reference only** (the CUDA kernels refuse such a rule): a
        two-pass K read. Pass 1 reads every block's K hi plane (tier 8) and bounds each block's
        largest weight from above (:func:`k_weight_shift`); a block whose weights lie ``w``
        binary orders below the row's largest has ``max(0, w - k_weight_margin)`` added to
        every channel's K gap, so far-off blocks stay at tier 8. Channels read at 12 or 16 bits
        re-read their hi row in pass 2 (counted). ``None``: single pass (every named rule).
    k_weight_z : int or None
        With ``k_weight_margin``: bound the pass-1 score error by ``k_weight_z`` standard
        deviations of the tier-8 rounding (a statistical bound) instead of its worst case
        (``None``, sound). :func:`k_weight_shift`.
    """

    name: str = "seed"
    k_thresholds: tuple = (8, 4)
    v_thresholds: tuple = (8, 4)
    topk: int = 32
    v_bias: int = 0
    v_skip: int | None = None
    k_weight_margin: int | None = None
    k_weight_z: int | None = None

    def __post_init__(self):
        # every field is a kernel argument (int32): integers only, so that the reference and
        # the kernels see the same values; lists become tuples (the rule is hashable)
        def integer(name, value):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name}: expected an integer, got {value!r}")
            return int(value)

        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a string, got {self.name!r}")
        for side in ("k_thresholds", "v_thresholds"):
            pair = getattr(self, side)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"{side}: expected two integers (tier-8 gap, tier-12 gap), "
                                f"got {pair!r}")
            t8, t12 = (integer(side, x) for x in pair)
            if not (t8 >= t12 >= 0):
                raise ValueError(f"{side}: expected (tier-8 gap, tier-12 gap) with "
                                 f"tier-8 gap >= tier-12 gap >= 0, got {(t8, t12)}")
            object.__setattr__(self, side, (t8, t12))
        object.__setattr__(self, "topk", integer("topk", self.topk))
        if not 1 <= self.topk <= 1024:
            raise ValueError(f"topk: expected 1..1024, got {self.topk}")
        object.__setattr__(self, "v_bias", integer("v_bias", self.v_bias))
        if not -64 <= self.v_bias <= 64:
            raise ValueError(f"v_bias: expected -64..64 binary orders, got {self.v_bias}")
        if self.v_skip is not None:
            object.__setattr__(self, "v_skip", integer("v_skip", self.v_skip))
            if not self.v_thresholds[0] <= self.v_skip < NEVER_SKIP:
                raise ValueError(f"v_skip: expected none (null in YAML) or a gap in "
                                 f"{self.v_thresholds[0]}..{NEVER_SKIP - 1} (at least the "
                                 f"tier-8 gap), got {self.v_skip}")

        if self.k_weight_margin is not None:
            object.__setattr__(self, "k_weight_margin",
                               integer("k_weight_margin", self.k_weight_margin))
            if not 0 <= self.k_weight_margin <= 64:
                raise ValueError(f"k_weight_margin: expected none or 0..64 binary orders, "
                                 f"got {self.k_weight_margin}")
        if self.k_weight_z is not None:
            object.__setattr__(self, "k_weight_z", integer("k_weight_z", self.k_weight_z))
            if self.k_weight_margin is None or not 1 <= self.k_weight_z <= 16:
                raise ValueError(f"k_weight_z: expected none, or 1..16 with k_weight_margin "
                                 f"set, got {self.k_weight_z}")

    @property
    def v_skip_gap(self) -> int:
        """``v_skip`` as the kernels take it (:data:`NEVER_SKIP` for ``None``)."""
        return NEVER_SKIP if self.v_skip is None else int(self.v_skip)


#: The seed's rule of DESIGN.md section 4.
SEED_RULE = AlignmentRule()

#: The seed with K one binary order stricter and V tokens far below the output skipped
#: (docs/fidelity.md, "Rules": chosen on real SmolLM2 K/V for error <= 1.5x plain fp16 and
#: <= 12 bits per value at 2k tokens).
TUNED_RULE = AlignmentRule(name="tuned", k_thresholds=(9, 5), v_thresholds=(8, 4), topk=32,
                           v_bias=0, v_skip=14)

#: K and V thresholds two binary orders above the seed's, V rows 16 orders below the output
#: skipped: plain fp16's attention error or less and the AlignedKV paper's Table-1 rows on
#: real SmolLM2 K/V, at about 1.2 more bits per value than ``tuned`` (docs/fidelity.md).
PRECISE_RULE = AlignmentRule(name="precise", k_thresholds=(10, 6), v_thresholds=(10, 6),
                             topk=32, v_bias=0, v_skip=16)

#: Named rules (``--rule NAME`` of bench, eval and run; ``rule: NAME`` in a run config).
RULES = {r.name: r for r in (SEED_RULE, TUNED_RULE, PRECISE_RULE)}


class UnknownRuleError(KeyError, ValueError):
    """An unknown rule name: a ``ValueError`` like every other bad argument, and a
    ``KeyError`` as :data:`RULES` lookups raise."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def named_rule(name: str) -> AlignmentRule:
    """The rule of :data:`RULES` called ``name``.

    Raises UnknownRuleError (a ValueError and a KeyError) naming the known rules."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise UnknownRuleError(f"rule: unknown named rule {name!r} (named rules: "
                               f"{', '.join(RULES)})") from None

MODES = ("aligned", "full")

#: When the V rule runs (``AlignedKVCache(v_rule=...)``, docs/design.md "The V-whole path"):
#: ``auto`` on calls whose V, read whole, is more than :data:`V_RULE_MIN_BYTES`; ``always``
#: on every aligned call (the paper's rule as given); ``never``: V is always read whole.
V_RULE_POLICIES = ("auto", "always", "never")

#: ``v_rule="auto"``: the V rule runs on a call only when its V cache, read whole (batch x KV
#: heads x the longest sequence's blocks x 64 tokens x head_dim x 2 bytes), is more than
#: this. Below it the V rule's estimate phase (~6 us at 4k tokens) costs more time than its
#: fewer V bytes save. Measured on the H200 (docs/perf-notes.md, seventeenth session: the
#: V-whole path in its two launches, the flash kernel and the combine, against the V rule's
#: four launches, us, interleaved rounds): faster up to 128 MiB of V (SmolLM2 8 x 32k,
#: 96 MiB: 63.5 against 76.6; Llama-3-8B 1 x 32k, 64 MiB: 47.9 against 62.0; 8 x 8k,
#: 128 MiB: 83.9 against 90.2; Llama-2-7B 1 x 16k, 128 MiB: 68.9 against 68.7). Above it
#: the V rule is clearly faster at MHA (Llama-2-7B 8 x 4k, 256 MiB: 115.5 against 126.9;
#: 1 x 32k: 118.8 against 127.8; 8 x 16k, 1 GiB: 387.6 against 470.7); at GQA the two stay
#: within a few percent up to 384 MiB, either way (docs/benchmarks.md, seventeenth session's
#: grid, ms, V rule / flash: Llama-3-8B 8 x 16k 0.1518 / 0.1546, 32 x 4k 0.1588 / 0.1561,
#: 1 x 128k 0.1702 / 0.1591; SmolLM2 32 x 16k 0.1233 / 0.1139, 32 x 32k 0.2199 / 0.2162)
#: and the V rule wins from 512 MiB (Llama-3-8B 8 x 32k 0.2823 / 0.2963). One threshold
#: for every shape; with the split kernel (fifteenth session) the crossing had been
#: between 96 and 128 MiB, and the threshold 64 MiB.
V_RULE_MIN_BYTES = 128 << 20


def check_mode(mode) -> None:
    """ValueError naming ``mode`` unless it is one of :data:`MODES`."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def check_v_rule(policy) -> None:
    """ValueError naming ``v_rule`` unless ``policy`` is one of :data:`V_RULE_POLICIES`."""
    if not isinstance(policy, str) or policy not in V_RULE_POLICIES:
        raise ValueError(f"v_rule: expected one of {V_RULE_POLICIES}, got {policy!r}")


def v_rule_applies(policy: str, batch: int, num_kv_heads: int, head_dim: int,
                   max_length: int) -> bool:
    """Whether an aligned decode call applies the V rule under ``policy`` (one of
    :data:`V_RULE_POLICIES`), or reads V whole (tier 16, K still at its tiers).

    Parameters
    ----------
    policy : str
    batch, num_kv_heads, head_dim : int
    max_length : int
        Tokens of the batch's longest sequence.

    Raises ValueError for an unknown policy. Source: docs/design.md, "The V-whole path";
    the threshold is :data:`V_RULE_MIN_BYTES`."""
    check_v_rule(policy)
    if policy != "auto":
        return policy == "always"
    v_bytes = batch * num_kv_heads * blocks_for(max_length) * BLOCK_TOKENS * head_dim * 2
    return v_bytes > V_RULE_MIN_BYTES


def tier_from_gap(gap, thresholds, skip: int | None = None) -> np.ndarray:
    """Tier (uint8: 8, 12 or 16; 0 where ``gap >= skip``) for integer exponent gaps."""
    gap = np.asarray(gap)
    t8, t12 = thresholds
    tiers = np.where(gap >= t8, 8, np.where(gap >= t12, 12, 16)).astype(np.uint8)
    if skip is not None:
        tiers[gap >= skip] = 0
    return tiers


# ---------------------------------------------------------------- fp16 / fp32 bit helpers


def fp16_bits(x) -> np.ndarray:
    """uint16 view of an fp16 array."""
    x = np.asarray(x)
    if x.dtype != np.float16:
        raise TypeError(f"expected float16, got {x.dtype}")
    return x.view(np.uint16)


def exponent_field16(bits) -> np.ndarray:
    """Biased fp16 exponent field E(x) of uint16 bit patterns; subnormal and zero count as 1."""
    e = (np.asarray(bits).astype(np.int32) >> 10) & 0x1F
    return np.maximum(e, 1)


def hi_exponent_field(hi) -> np.ndarray:
    """E(x) read from the hi plane byte alone (the exponent lies wholly in it)."""
    e = (np.asarray(hi).astype(np.int32) >> 2) & 0x1F
    return np.maximum(e, 1)


def unbiased_exponent32(x) -> np.ndarray:
    """floor(log2|x|) of float32 values from the exponent field (subnormal and 0 → -126)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    e = ((bits >> 23) & 0xFF).astype(np.int32)
    return np.maximum(e, 1) - 127


def split_planes(x) -> tuple:
    """Split fp16 values into (hi byte, mid nibble, lo nibble), each uint8, same shape."""
    b = fp16_bits(x)
    return ((b >> 8).astype(np.uint8), ((b >> 4) & 0xF).astype(np.uint8),
            (b & 0xF).astype(np.uint8))


def join_planes(hi, mid, lo, tier) -> np.ndarray:
    """Rebuild fp16 from planes read at ``tier`` (scalar or broadcastable array).

    Dropped bits are refilled with the midpoint pattern (``0x80`` at tier 8, ``0x8`` at
    tier 12) so truncation is unbiased; values whose exponent field is all ones (Inf, NaN)
    are refilled with zeros so that Inf stays Inf (DESIGN.md section 3).
    """
    hi = np.asarray(hi).astype(np.uint16)
    mid = np.asarray(mid).astype(np.uint16)
    tier = np.asarray(tier)
    if tier.ndim == 0 and int(tier) >= 16:
        return ((hi << 8) | (mid << 4) | np.asarray(lo).astype(np.uint16)).view(np.float16)
    normal = ((hi & 0x7C) != 0x7C).astype(np.uint16)          # 0 for Inf/NaN: zero refill
    if tier.ndim == 0 and int(tier) < 12:
        return ((hi << 8) | (normal << 7)).view(np.float16)
    lo = np.asarray(lo).astype(np.uint16)
    low = np.where(tier >= 16, (mid << 4) | lo,
                   np.where(tier >= 12, (mid << 4) | (normal << 3), normal << 7))
    return ((hi << 8) | low.astype(np.uint16)).view(np.float16)


def pack_nibbles(even, odd) -> np.ndarray:
    """Pack two nibble arrays into bytes: ``even`` in the low nibble, ``odd`` in the high."""
    return (np.asarray(even, np.uint8) & 0xF) | ((np.asarray(odd, np.uint8) & 0xF) << 4)


def unpack_nibbles(packed, axis=-1) -> np.ndarray:
    """Inverse of :func:`pack_nibbles` along ``axis``: n bytes → 2n nibbles, interleaved."""
    packed = np.asarray(packed, np.uint8)
    low, high = packed & 0xF, packed >> 4
    out = np.stack([low, high], axis=axis if axis >= 0 else packed.ndim + axis + 1)
    shape = list(packed.shape)
    ax = axis if axis >= 0 else packed.ndim + axis
    shape[ax] *= 2
    return out.reshape(shape)


# ----------------------------------------------------------------------------- append


def append_tokens(planes: dict, block_table, starts, k, v, counts=None) -> None:
    """Write new tokens' K/V into the planes of one layer (twin of ``akv_append``).

    Parameters
    ----------
    planes : dict of str → numpy.ndarray
        One layer's planes, shapes of :meth:`PlaneLayout.plane_shape` without the layer axis.
        Modified in place.
    block_table : int32 [batch, blocks_per_sequence]
    starts : int [batch]
        Tokens already in each sequence before this append.
    k, v : float16 [batch, kv_heads, new_tokens, head_dim]
    counts : int [batch], optional
        New tokens to take from each sequence (default: all ``new_tokens``).

    Bytes shared by two tokens are read, modified and written so the neighbour's nibble is
    kept; a block's exponent maxima restart when its first token is written.
    """
    k = np.asarray(k)
    v = np.asarray(v)
    B, Hk, S, D = k.shape
    counts = np.full(B, S) if counts is None else np.asarray(counts)
    heads = np.arange(Hk)[None, :, None]
    chans = np.arange(D)[None, None, :]
    for b in range(B):
        n = int(counts[b])
        if n == 0:
            continue
        pos = int(starts[b]) + np.arange(n)
        blocks = np.asarray(block_table[b])[pos // BLOCK_TOKENS].astype(np.int64)
        offs = pos % BLOCK_TOKENS
        kb = np.ascontiguousarray(k[b, :, :n, :].transpose(1, 0, 2))   # [n, Hk, D]
        vb = np.ascontiguousarray(v[b, :, :n, :].transpose(1, 0, 2))
        k_hi, k_mid, k_lo = split_planes(kb)
        v_hi, v_mid, v_lo = split_planes(vb)
        blk = blocks[:, None, None]
        off = offs[:, None, None]
        # exponent maxima restart in a block whose first token is written now
        fresh = np.unique(blocks[offs == 0])
        planes["k_exp_max"][fresh] = 0
        planes["v_exp_max"][fresh] = 0
        np.maximum.at(planes["k_exp_max"], (blk, heads, chans),
                      hi_exponent_field(k_hi).astype(np.uint8))
        np.maximum.at(planes["v_exp_max"], (blk, heads, chans),
                      hi_exponent_field(v_hi).astype(np.uint8))
        # K: channel-major, token pairs share a nibble byte
        planes["k_hi"][blk, heads, chans, off] = k_hi
        for parity in (0, 1):
            sel = offs % 2 == parity
            if not sel.any():
                continue
            sb, so = blk[sel], off[sel] // 2
            for name, nib in (("k_mid", k_mid[sel]), ("k_lo", k_lo[sel])):
                old = planes[name][sb, heads, chans, so]
                keep = np.uint8(0xF0 if parity == 0 else 0x0F)
                new = nib if parity == 0 else (nib << 4).astype(np.uint8)
                planes[name][sb, heads, chans, so] = (old & keep) | new
        # V: token-major, channel pairs of one token share a byte
        rows = (blocks[:, None], np.arange(Hk)[None, :], offs[:, None])
        planes["v_hi"][rows] = v_hi
        planes["v_mid"][rows] = pack_nibbles(v_mid[..., 0::2], v_mid[..., 1::2])
        planes["v_lo"][rows] = pack_nibbles(v_lo[..., 0::2], v_lo[..., 1::2])


def _gather_k(planes, blocks):
    """K planes of the given blocks as nibble-unpacked arrays [nblk, Hk, D, 64]."""
    return (planes["k_hi"][blocks], unpack_nibbles(planes["k_mid"][blocks]),
            unpack_nibbles(planes["k_lo"][blocks]))


def _gather_v(planes, blocks):
    """V planes of the given blocks as nibble-unpacked arrays [nblk, Hk, 64, D]."""
    return (planes["v_hi"][blocks], unpack_nibbles(planes["v_mid"][blocks]),
            unpack_nibbles(planes["v_lo"][blocks]))


def read_sequence(planes: dict, block_table_row, length: int, tier=16) -> tuple:
    """Read one sequence back from one layer's planes at ``tier``.

    Returns ``(K, V)``, float16 ``[kv_heads, length, head_dim]``. At tier 16 these equal the
    appended values bit for bit.
    """
    nblk = blocks_for(length)
    blocks = np.asarray(block_table_row)[:nblk].astype(np.int64)
    kh, km, kl = _gather_k(planes, blocks)
    K = join_planes(kh, km, kl, tier)                       # [nblk, Hk, D, 64]
    K = K.transpose(1, 0, 3, 2).reshape(K.shape[1], -1, K.shape[2])[:, :length]
    vh, vm, vl = _gather_v(planes, blocks)
    V = join_planes(vh, vm, vl, tier)                       # [nblk, Hk, 64, D]
    V = V.transpose(1, 0, 2, 3).reshape(V.shape[1], -1, V.shape[3])[:, :length]
    return K, V


# ------------------------------------------------------------------------------ tiers


def k_tiers(q, k_exp_max, rule: AlignmentRule = SEED_RULE) -> np.ndarray:
    """K-side tiers per (KV head, block, channel) for one sequence's decode query.

    ``a_i = E(q_i) + k_exp_max[block, i]``, ``gap_i = max_i a_i - a_i``, tier by
    ``rule.k_thresholds``; a channel is read at the highest tier any query head of its GQA
    group needs; a block-channel holding Inf/NaN (exponent 31) is read at 16 bits
    (DESIGN.md section 4).

    Parameters
    ----------
    q : float16 [query_heads, D]
    k_exp_max : uint8 [blocks, kv_heads, D]

    Returns
    -------
    uint8 [kv_heads, blocks, D]
    """
    q = np.asarray(q)
    Hq, D = q.shape
    Hk = np.asarray(k_exp_max).shape[1]
    eq = exponent_field16(fp16_bits(q)).reshape(Hk, Hq // Hk, D)
    ek = np.asarray(k_exp_max).astype(np.int32).transpose(1, 0, 2)          # [Hk,nblk,D]
    return _k_tiers_from_exponents(eq, ek, rule)


def _k_tiers_from_exponents(eq, ek, rule: AlignmentRule, shift=None) -> np.ndarray:
    """The K rule on exponent fields, batched over any leading axes.

    ``eq`` int32 [..., kv_heads, G, D] (E of the query heads of each group), ``ek`` int32
    [..., kv_heads, blocks, D] (block channel exponent maxima) → uint8 [..., kv_heads, blocks,
    D]. ``shift`` (int, [..., kv_heads, G, blocks]) is added to every channel's gap
    (:func:`k_weight_shift`). Shared by :func:`k_tiers` and :func:`causal_decode_attention`.
    """
    a = eq[..., :, :, None, :] + ek[..., :, None, :, :]                 # [...,Hk,G,nblk,D]
    gap = a.max(axis=-1, keepdims=True) - a
    if shift is not None:
        gap = gap + np.asarray(shift)[..., None]
    tiers = tier_from_gap(gap, rule.k_thresholds).max(axis=-3)          # [...,Hk,nblk,D]
    tiers[np.broadcast_to(ek == FP16_SPECIAL_EXPONENT, tiers.shape)] = 16
    return tiers


def k_weight_shift(q, K8, k_exp_max, length: int, scale, margin: int,
                   z: int | None = None) -> np.ndarray:
    """Pass 1 of the two-pass K read (``AlignmentRule.k_weight_margin``; a design study).

    Scores from K read at tier 8 (hi plane, midpoint refill) are within
    ``E_b = scale · Σ_d |q_d| · 2^(k_exp_max[b, d] - 18)`` of the full-precision scores (a
    value of biased exponent field ``e`` loses at most half of ``2^(e - 17)``). With
    ``U_b = max_t s8_t + E_b`` (a bound on the block's largest score) and ``L = max_b (max_t
    s8_t - E_b)`` (a bound below the row's largest), every weight of block ``b`` is at most
    ``2^-w_b`` times the row's largest, ``w_b = floor((L - U_b) / ln 2)``. Returns
    ``max(0, w_b - margin)``: the binary orders added to the block's K gaps. Blocks holding
    Inf/NaN (exponent 31) get 0.

    With ``z``, ``E_b`` is instead ``z`` standard deviations of the summed rounding errors,
    each taken as uniform over its worst-case span: ``E_b = z · scale · sqrt(Σ_d q_d² ·
    4^(k_exp_max[b, d] - 18) / 3)`` — tighter (errors of random sign partly cancel), no longer
    a guarantee.

    Parameters
    ----------
    q : float16 [query_heads, D]
    K8 : float32 [kv_heads, blocks * 64, D]
        K read at tier 8 (:func:`join_planes` at tier 8; Inf/NaN may stay).
    k_exp_max : uint8/int [blocks, kv_heads, D]
    length : int
        Tokens in the sequence (the last block's tokens past it are masked).
    scale : float
        The score scale (``1/sqrt(D)``).
    margin : int
        ``AlignmentRule.k_weight_margin``.
    z : int, optional
        ``AlignmentRule.k_weight_z`` (statistical bound); None: the worst case.

    Returns
    -------
    int64 [kv_heads, G, blocks]
    """
    q = np.asarray(q)
    Hq, D = q.shape
    nblk, Hk = np.asarray(k_exp_max).shape[:2]
    G = Hq // Hk
    ek = np.asarray(k_exp_max).astype(np.int64).transpose(1, 0, 2)      # [Hk, nblk, D]
    special = (ek == FP16_SPECIAL_EXPONENT).any(axis=-1)                # [Hk, nblk]
    qa = np.abs(q.astype(np.float64)).reshape(Hk, G, D)
    if z is None:
        bound = float(scale) * np.einsum("hgd,hbd->hgb", qa, np.exp2(ek - 18.0))
    else:
        bound = float(scale) * z * np.sqrt(
            np.einsum("hgd,hbd->hgb", qa ** 2, np.exp2(2 * (ek - 18.0))) / 3)
    K8 = np.where(np.isfinite(K8), K8, 0).astype(np.float64)
    s8 = np.einsum("hgd,hjd->hgj", q.astype(np.float64).reshape(Hk, G, D), K8) * float(scale)
    valid = np.arange(nblk * BLOCK_TOKENS) < length
    s8 = np.where(valid, s8, -np.inf).reshape(Hk, G, nblk, BLOCK_TOKENS).max(axis=-1)
    upper = s8 + bound
    lower = np.max(s8 - bound, axis=-1, keepdims=True)
    w = np.floor((lower - upper) / np.log(2.0))
    shift = np.maximum(0, w - margin)
    shift = np.where(special[:, None, :] | ~np.isfinite(shift), 0, shift)
    return shift.astype(np.int64)


def v_reference_exponent(o_est, v_exp_max, rule: AlignmentRule = SEED_RULE) -> np.ndarray:
    """``r[h, block] = min_d (e(O_est[h, d]) - e(v_exp_max[block, d])) + bias`` (int32).

    ``e`` is the unbiased exponent (fp32 for O_est, fp16 for V), so that the product bound
    ``p·v < 2^(e(p)+1) · 2^(e(vmax)+1)`` is compared with the output's size.

    Parameters
    ----------
    o_est : float32 [query_heads, D]
    v_exp_max : uint8 [blocks, kv_heads, D]

    Returns
    -------
    int32 [query_heads, blocks]
    """
    return _v_reference_from_exponents(unbiased_exponent32(o_est),
                                       np.asarray(v_exp_max).astype(np.int32), rule)


def _v_reference_from_exponents(eo, ev, rule: AlignmentRule) -> np.ndarray:
    """``r`` of :func:`v_reference_exponent`, batched over leading axes: ``eo`` int32
    [..., query_heads, D] (unbiased exponents of O_est), ``ev`` int32 [..., blocks, kv_heads,
    D] (biased V exponent maxima) → int32 [..., query_heads, blocks]."""
    Hq = eo.shape[-2]
    Hk = ev.shape[-2]
    evu = np.maximum(ev, 1) - 15
    ev_q = np.repeat(np.swapaxes(evu, -3, -2), Hq // Hk, axis=-3)          # [...,Hq,nblk,D]
    return (eo[..., :, None, :] - ev_q).min(axis=-1) + int(rule.v_bias)


def v_tiers(p, o_est, v_exp_max, length: int, rule: AlignmentRule = SEED_RULE) -> np.ndarray:
    """V-side tiers per (KV head, token) for one sequence (DESIGN.md section 4).

    ``gap_j = r[h, block(j)] - e(p_j)`` with ``r`` from :func:`v_reference_exponent`; tier by
    ``rule.v_thresholds``, tier 0 (the token is not read) where
    ``gap_j >= rule.v_skip + skip_budget(length)``; the highest tier over the GQA group; every token of a block whose V holds Inf/NaN
    (exponent 31) is read at 16 bits.

    Parameters
    ----------
    p : float32 [query_heads, >= length]
        Normalised attention weights.
    o_est : float32 [query_heads, D]
    v_exp_max : uint8 [blocks, kv_heads, D]

    Returns
    -------
    uint8 [kv_heads, length]
    """
    return _v_tiers_from(np.asarray(p)[:, :length], o_est, np.asarray(v_exp_max), rule,
                         np.asarray(length))


def skip_budget(length) -> np.ndarray:
    """Binary orders added to ``rule.v_skip`` for a sequence of ``length`` tokens:
    ``ceil(ceil(log2 length) / 2)``, i.e. the skipped terms may add up like ``sqrt(length)``
    random-sign terms and stay ``v_skip`` orders below the output (int, elementwise; the
    kernels compute the same from ``__clz``). 1 token: 0; 4096: 6; 32768: 8."""
    n = np.maximum(np.asarray(length, np.int64), 1)
    ceil_log2 = np.ceil(np.log2(n)).astype(np.int64)
    ceil_log2 = np.where(np.left_shift(1, ceil_log2) < n, ceil_log2 + 1, ceil_log2)  # exact
    return (ceil_log2 + 1) // 2


def _v_tiers_from(p, o_est, v_exp_max, rule: AlignmentRule, lengths) -> np.ndarray:
    """The V rule batched over leading axes: ``p`` float32 [..., query_heads, n], ``o_est``
    float32 [..., query_heads, D], ``v_exp_max`` uint8 [..., blocks, kv_heads, D],
    ``lengths`` int [...] (tokens in each sequence, for the skip budget) → uint8
    [..., kv_heads, n]. Shared by :func:`v_tiers` and :func:`causal_decode_attention`."""
    Hq, n = p.shape[-2:]
    Hk = v_exp_max.shape[-2]
    r = _v_reference_from_exponents(unbiased_exponent32(o_est),
                                    v_exp_max.astype(np.int32), rule)       # [...,Hq,nblk]
    token_block = np.arange(n) // BLOCK_TOKENS
    gap = r[..., token_block] - unbiased_exponent32(p)
    skip = None
    if rule.v_skip is not None:   # per sequence: v_skip + skip_budget(length)
        skip = (rule.v_skip + skip_budget(lengths))[..., None, None]
    tiers = tier_from_gap(gap, rule.v_thresholds, skip)
    tiers = tiers.reshape(tiers.shape[:-2] + (Hk, Hq // Hk, n)).max(axis=-2)  # [...,Hk,n]
    special = np.swapaxes((v_exp_max == FP16_SPECIAL_EXPONENT).any(axis=-1), -1, -2)
    tiers[special[..., token_block]] = 16                                     # [...,Hk,n]
    return tiers


# ------------------------------------------------------------------- decode attention


@dataclass
class DecodeResult:
    """What :func:`decode_attention` returns.

    Attributes
    ----------
    output : float16 [batch, query_heads, D]
    counters : int64 [len(COUNTER_NAMES)]
        Bytes read per plane, metadata bytes and K values covered (the kernel's counters).
    k_tiers, v_tiers : list (per sequence) of uint8 [kv_heads, blocks, D] / [kv_heads, length]
    scores, weights : list of float32 [query_heads, length]
    stats : float32 [batch, query_heads, 2] – global max and sum
    o_est : float32 [batch, query_heads, D]
    """

    output: np.ndarray
    counters: np.ndarray
    k_tiers: list = field(default_factory=list)
    v_tiers: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    stats: np.ndarray | None = None
    o_est: np.ndarray | None = None

    def counter_dict(self) -> dict:
        return {n: int(c) for n, c in zip(COUNTER_NAMES, self.counters)}


def bits_per_value(counters) -> dict:
    """Bits read per cached value from byte counters: ``{"k", "v", "total"}``.

    ``total`` includes the metadata (exponent maxima and the V estimate's rows).
    """
    c = dict(zip(COUNTER_NAMES, np.asarray(counters, dtype=np.float64)))
    values = max(c["values"], 1.0)
    k = 8 * (c["k_hi_bytes"] + c["k_mid_bytes"] + c["k_lo_bytes"]) / values
    v = 8 * (c["v_hi_bytes"] + c["v_mid_bytes"] + c["v_lo_bytes"]) / values
    total = (k + v) / 2 + 8 * c["metadata_bytes"] / (2 * values)
    return {"k": float(k), "v": float(v), "total": float(total)}


def estimate_blocks(block_max, topk: int) -> np.ndarray:
    """The "approximate top-k": indices of the ``topk`` blocks with the largest block
    maximum score, ties to the lower block index (the order the kernel selects them in).

    Parameters
    ----------
    block_max : float32 [blocks]
    """
    order = np.lexsort((np.arange(block_max.shape[0]), -block_max.astype(np.float64)))
    return order[:min(topk, block_max.shape[0])]


def decode_attention(planes: dict, q, block_table, lengths, mode: str = "aligned",
                     rule: AlignmentRule = SEED_RULE, scale: float | None = None,
                     keep_debug: bool = False, v_whole: bool = False) -> DecodeResult:
    """Decode attention of one query token per sequence against one layer's planes.

    The twin of the four CUDA decode kernels (DESIGN.md section 5): K read at
    :func:`k_tiers`, fp32 scores, per-block max/arg-max/sum, global max ``m`` and sum ``l``,
    the V-side estimate ``O_est_d = Σ_{j∈S} p_j |v8_jd|`` over the arg-max tokens of the
    top-``rule.topk`` blocks (hi plane only), V read at :func:`v_tiers`, fp32 output.
    With ``v_whole`` (and always in ``full`` mode) it is the twin of the V-whole path (the
    flash or the split kernel and the combine, or three launches; docs/design.md): no estimate
    (``o_est`` stays zero, its rows are not counted), every V token at tier 16, no V
    exponent maxima read; the kernels normalise per split and
    merge the splits, which equals this global softmax up to fp32 rounding.

    Parameters
    ----------
    planes : dict of str → ndarray
        One layer's planes.
    q : float16 [batch, query_heads, D]
    block_table : int32 [batch, blocks_per_sequence]
    lengths : int [batch]
        Tokens in each sequence (each ≥ 1).
    mode : {"aligned", "full"}
        ``full`` reads all 16 bits (must match fp16 attention).
    rule : AlignmentRule
    scale : float, optional
        Score scale, default ``1/sqrt(D)``.
    keep_debug : bool
        Keep tiers, scores and weights per sequence in the result.
    v_whole : bool
        Read V whole (tier 16) with K at its tiers: an aligned call that
        :func:`v_rule_applies` leaves out of the V rule.
    """
    check_mode(mode)
    q = np.asarray(q)
    B, Hq, D = q.shape
    Hk = planes["k_exp_max"].shape[1]
    G = Hq // Hk
    scale = np.float32(1.0 / np.sqrt(D) if scale is None else scale)
    out = np.zeros((B, Hq, D), np.float16)
    counters = np.zeros(len(COUNTER_NAMES), np.int64)
    result = DecodeResult(out, counters, stats=np.zeros((B, Hq, 2), np.float32),
                          o_est=np.zeros((B, Hq, D), np.float32))
    for b in range(B):
        n = int(lengths[b])
        nblk = blocks_for(n)
        blocks = np.asarray(block_table[b])[:nblk].astype(np.int64)
        kexp = planes["k_exp_max"][blocks]                      # [nblk, Hk, D]
        vexp = planes["v_exp_max"][blocks]
        kh, km, kl = _gather_k(planes, blocks)                  # [nblk, Hk, D, 64]
        if mode == "full":
            kt = np.full((Hk, nblk, D), 16, np.uint8)
        elif rule.k_weight_margin is None:
            kt = k_tiers(q[b], kexp, rule)
        else:                                                   # two-pass K (a study)
            K8 = join_planes(kh, km, kl, 8).astype(np.float32)
            K8 = K8.transpose(1, 0, 3, 2).reshape(Hk, nblk * BLOCK_TOKENS, D)
            shift = k_weight_shift(q[b], K8, kexp, n, scale, rule.k_weight_margin,
                                   rule.k_weight_z)
            eq = exponent_field16(fp16_bits(q[b])).reshape(Hk, G, D)
            kt = _k_tiers_from_exponents(eq, kexp.astype(np.int32).transpose(1, 0, 2), rule,
                                         shift)
        K = join_planes(kh, km, kl, kt.transpose(1, 0, 2)[..., None]).astype(np.float32)
        K = K.transpose(1, 0, 3, 2).reshape(Hk, nblk * BLOCK_TOKENS, D)
        qf = q[b].astype(np.float32).reshape(Hk, G, D)
        s = np.einsum("hgd,hjd->hgj", qf.astype(np.float64), K.astype(np.float64))
        s = (s.astype(np.float32) * scale).reshape(Hq, -1)      # [Hq, nblk*64]
        valid = np.arange(nblk * BLOCK_TOKENS) < n
        s_masked = np.where(valid[None], s, -np.inf).reshape(Hq, nblk, BLOCK_TOKENS)
        bmax = s_masked.max(axis=-1)                            # [Hq, nblk]
        barg = s_masked.argmax(axis=-1) + np.arange(nblk) * BLOCK_TOKENS
        with np.errstate(invalid="ignore", over="ignore"):
            bsum = np.exp(s_masked - bmax[..., None]).sum(axis=-1, dtype=np.float32)
            # a block with no finite score adds nothing (the kernels skip it), not NaN
            bsum = np.where(bmax == -np.inf, np.float32(0), bsum)
            m = bmax.max(axis=-1)                               # [Hq]
            l = (bsum * np.exp(bmax - m[:, None])).sum(axis=-1, dtype=np.float32)
            p = (np.exp(s[:, :n] - m[:, None]) / l[:, None]).astype(np.float32)
        result.stats[b, :, 0], result.stats[b, :, 1] = m, l
        vh, vm, vl = _gather_v(planes, blocks)                  # [nblk, Hk, 64, D]
        whole = v_whole or mode == "full"
        if whole:                               # the V-whole path: no estimate
            vt = np.full((Hk, n), 16, np.uint8)
        else:
            vt = _estimate_and_v_tiers(result, b, vh, vexp, bmax, barg, p, n, G, D, rule)
        vt_blocks = _token_tiers_to_blocks(vt, nblk)
        V = join_planes(vh, vm, vl, vt_blocks).astype(np.float32)
        V = np.where(vt_blocks == 0, np.float32(0), V)          # tier 0: not read
        V = V.transpose(1, 0, 2, 3).reshape(Hk, nblk * BLOCK_TOKENS, D)[:, :n]
        o = np.einsum("hgj,hjd->hgd", p.reshape(Hk, G, n).astype(np.float64),
                      V.astype(np.float64))
        out[b] = o.reshape(Hq, D).astype(np.float32).astype(np.float16)
        counters += _count_bytes(kt, vt, n, Hq, nblk, D, rule, estimate=not whole)
        if keep_debug:
            result.k_tiers.append(kt)
            result.v_tiers.append(vt)
            result.scores.append(s[:, :n])
            result.weights.append(p)
    return result


def _estimate_and_v_tiers(result, b, vh, vexp, bmax, barg, p, n, G, D, rule):
    """The V rule of :func:`decode_attention` for sequence ``b``: O_est (kept in
    ``result.o_est[b]``) and the V tiers [Hk, n]."""
    Hq = bmax.shape[0]
    # the V-side estimate from the top-k blocks' arg-max tokens (hi plane only)
    # slots in selection order, per query head: [Hq, k]
    sel = np.stack([estimate_blocks(bmax[h], rule.topk) for h in range(Hq)])
    tok = np.take_along_axis(barg, sel, axis=1)                       # [Hq, k]
    heads = np.arange(Hq)[:, None]
    hi_rows = vh[sel, heads // G, tok % BLOCK_TOKENS]                # [Hq, k, D]
    rows = np.abs(join_planes(hi_rows, 0, 0, 8).astype(np.float32))
    terms = p[heads, tok][..., None] * rows                           # fp32 products
    o_est = np.zeros((Hq, D), np.float32)
    for r in range(sel.shape[1]):                                     # the kernel's order
        o_est += terms[:, r]
    result.o_est[b] = o_est
    return v_tiers(p, o_est, vexp, n, rule)


@dataclass
class CausalResult:
    """What :func:`causal_decode_attention` returns.

    Attributes
    ----------
    output : float16 [query_heads, N, D]
        Row ``t``: the decode output for a cache of tokens ``0..t`` queried by ``q[:, t]``.
    counters : int64 [len(COUNTER_NAMES)]
        The decode kernels' byte counters summed over the N decode steps.
    k_tiers : list of uint8 [kv_heads, blocks_t, D] per position (``keep_debug``)
    v_tiers : list of uint8 [kv_heads, t + 1] per position (``keep_debug``)
    """

    output: np.ndarray
    counters: np.ndarray
    k_tiers: list = field(default_factory=list)
    v_tiers: list = field(default_factory=list)

    def counter_dict(self) -> dict:
        return {n: int(c) for n, c in zip(COUNTER_NAMES, self.counters)}


def causal_decode_attention(q, K, V, mode: str = "aligned", rule: AlignmentRule = SEED_RULE,
                            scale: float | None = None,
                            keep_debug: bool = False) -> CausalResult:
    """Every decode step of one sequence at once: teacher forcing through the aligned cache.

    Row ``t`` of the output is what :func:`decode_attention` returns for a cache that holds
    tokens ``0..t`` of ``K``/``V`` (appended in order, so the last block's exponent maxima
    cover only the tokens up to ``t``) queried by ``q[:, t]``: the same tiers, the same fp32
    scores, block statistics, top-k estimate and weights, computed for all positions with
    batched matrix products instead of ``N`` calls. Use it for teacher-forced perplexity
    (issue 5): one forward pass of a model whose every attention row is a decode step.

    Parameters
    ----------
    q : float16 [query_heads, N, D]
        Post-RoPE queries of positions ``0..N-1``.
    K, V : float16 [kv_heads, N, D]
        Post-RoPE keys and values; ``query_heads`` a multiple of ``kv_heads`` (GQA).
    mode : {"aligned", "full"}
    rule : AlignmentRule
    scale : float, optional
        Score scale, default ``1/sqrt(D)``.
    keep_debug : bool
        Keep the tiers of every position (memory grows as N²; for tests).

    Returns
    -------
    CausalResult

    Raises
    ------
    TypeError
        q, K or V not float16, or ``rule`` not an :class:`AlignmentRule`.
    ValueError
        Shapes that disagree, head counts that do not divide, an odd head_dim, no positions,
        or an unknown mode.

    Notes
    -----
    Sums in float64 as :func:`decode_attention` does; the order of the float64 sums differs,
    so an fp32 score or output can differ from the per-step reference in its last bit (about
    once in 10⁸); tiers are integer functions of those values (tests/test_reference.py).
    """
    check_mode(mode)
    arrays = {"q": np.asarray(q), "K": np.asarray(K), "V": np.asarray(V)}
    for name, x in arrays.items():
        if x.dtype != np.float16:
            raise TypeError(f"{name}: expected float16, got {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"{name}: expected 3 dimensions [heads, N, D], got shape {x.shape}")
    q, K, V = arrays["q"], arrays["K"], arrays["V"]
    Hq, N, D = q.shape
    Hk = K.shape[0]
    if K.shape != V.shape or K.shape[1:] != (N, D):
        raise ValueError(f"K, V: expected [kv_heads, {N}, {D}] each, got {K.shape} and "
                         f"{V.shape}")
    if Hk < 1 or Hq % Hk:
        raise ValueError(f"q: {Hq} query heads is not a multiple of {Hk} KV heads")
    if D < 2 or D % 2:
        raise ValueError(f"q: head_dim {D} is not a positive even number (V channel pairs "
                         f"share a nibble byte)")
    if N < 1:
        raise ValueError("q: no positions (N = 0)")
    if not isinstance(rule, AlignmentRule):
        raise TypeError(f"rule: expected an AlignmentRule, got {type(rule).__name__}")
    if mode == "aligned" and rule.k_weight_margin is not None:
        raise NotImplementedError("rule.k_weight_margin (the two-pass K study) runs in "
                                  "decode_attention only, not in causal_decode_attention")
    G = Hq // Hk
    T = BLOCK_TOKENS
    scale = np.float32(1.0 / np.sqrt(D) if scale is None else scale)
    nblk = blocks_for(N)
    pad = ((0, 0), (0, nblk * T - N), (0, 0))
    Kp, Vp = np.pad(K, pad), np.pad(V, pad)                  # zeros: E = 1, never a maximum
    tiers_of = (8, 12, 16)
    k_read = {t: join_planes(*split_planes(Kp), t).astype(np.float64)
              .reshape(Hk, nblk, T, D) for t in tiers_of}
    v_read = {t: join_planes(*split_planes(Vp), t).astype(np.float64) for t in tiers_of}
    for t in (8, 12):   # Inf/NaN only ever meet tier 16; keep 0 × Inf out of the products
        k_read[t][~np.isfinite(k_read[t])] = 0
        v_read[t][~np.isfinite(v_read[t])] = 0
    v_special = ~np.isfinite(v_read[16]).all(axis=(0, 2))    # [nblk*64] tokens with Inf/NaN
    v_rows8 = np.abs(join_planes(split_planes(Vp)[0], 0, 0, 8).astype(np.float32))
    # exponent maxima as the cache holds them: whole blocks, and a running maximum inside
    # the block being filled (append restarts a block's maxima at its first token)
    ek_run = np.maximum.accumulate(exponent_field16(fp16_bits(Kp)).reshape(Hk, nblk, T, D),
                                   axis=2)
    ev_run = np.maximum.accumulate(exponent_field16(fp16_bits(Vp)).reshape(Hk, nblk, T, D),
                                   axis=2)
    eq = exponent_field16(fp16_bits(q))                      # [Hq, N, D]
    qf = q.astype(np.float64).reshape(Hk, G, N, D)
    kv_of_head = np.arange(Hq) // G
    out = np.zeros((Hq, N, D), np.float16)
    counters = np.zeros(len(COUNTER_NAMES), np.int64)
    result = CausalResult(out, counters)
    for c in range(nblk):                                    # the positions of block c
        t0, t1 = c * T, min(N, c * T + T)
        P, nb, width = t1 - t0, c + 1, (c + 1) * T
        pos = np.arange(t0, t1)
        valid = np.arange(width)[None, :] <= pos[:, None]    # [P, width]
        ek = np.broadcast_to(ek_run[:, None, :nb, -1], (Hk, P, nb, D)).copy()
        ek[:, :, c] = ek_run[:, c, :P]
        ev = np.broadcast_to(ev_run[:, None, :nb, -1], (Hk, P, nb, D)).copy()
        ev[:, :, c] = ev_run[:, c, :P]
        ek = ek.transpose(1, 0, 2, 3)                        # [P, Hk, nb, D]
        ev = ev.transpose(1, 2, 0, 3)                        # [P, nb, Hk, D]
        if mode == "full":
            kt = np.full((P, Hk, nb, D), 16, np.uint8)
        else:
            eq_c = eq[:, t0:t1].reshape(Hk, G, P, D).transpose(2, 0, 1, 3)
            kt = _k_tiers_from_exponents(eq_c, ek, rule)      # [P, Hk, nb, D]
        s = np.zeros((Hk, nb, G, P, T))
        q_c = qf[:, :, t0:t1][:, None]                       # [Hk, 1, G, P, D]
        for t in tiers_of:
            m = (kt == t).transpose(1, 2, 0, 3)[:, :, None]  # [Hk, nb, 1, P, D]
            if m.any():   # Inf/NaN of tokens past a position stay in masked scores
                with np.errstate(invalid="ignore", over="ignore"):
                    s += np.matmul(q_c * m, k_read[t][:, :nb, None].swapaxes(-1, -2))
        s = (s.transpose(0, 2, 3, 1, 4).astype(np.float32) * scale).reshape(Hq, P, nb, T)
        with np.errstate(invalid="ignore", over="ignore"):
            s_masked = np.where(valid.reshape(P, nb, T)[None], s, -np.inf)
            bmax = s_masked.max(axis=-1)                      # [Hq, P, nb]
            barg = s_masked.argmax(axis=-1) + np.arange(nb) * T
            bsum = np.exp(s_masked - bmax[..., None]).sum(axis=-1, dtype=np.float32)
            bsum = np.where(bmax == -np.inf, np.float32(0), bsum)   # as decode_attention
            m_row = bmax.max(axis=-1)                         # [Hq, P]
            l_row = (bsum * np.exp(bmax - m_row[..., None])).sum(axis=-1, dtype=np.float32)
            p = np.exp(s.reshape(Hq, P, width) - m_row[..., None]) / l_row[..., None]
        p = np.where(valid[None], p, np.float32(0)).astype(np.float32)
        # the V-side estimate: arg-max tokens of the top-k blocks, hi plane only
        k_sel = min(rule.topk, nb)
        order = np.argsort(-bmax.astype(np.float64), axis=-1, kind="stable")[..., :k_sel]
        tok = np.take_along_axis(barg, order, axis=-1)        # [Hq, P, k]
        terms = np.take_along_axis(p, tok, axis=-1)[..., None] * \
            v_rows8[kv_of_head[:, None, None], tok]           # [Hq, P, k, D] fp32
        o_est = np.zeros((Hq, P, D), np.float32)
        for r in range(k_sel):                                # the kernel's order
            o_est += terms[:, :, r]
        if mode == "full":
            vt = np.full((P, Hk, width), 16, np.uint8)
        else:
            vt = _v_tiers_from(p.transpose(1, 0, 2), o_est.transpose(1, 0, 2), ev, rule,
                               pos + 1)
        o = np.zeros((Hk, G, P, D))
        pg = p.reshape(Hk, G, P, width).astype(np.float64)
        vt_h = vt.transpose(1, 0, 2)[:, None]                 # [Hk, 1, P, width]
        for t in tiers_of:
            m = vt_h == t
            if t == 16 and v_special[:width].any():   # rows sum only their own tokens
                for i in range(P):
                    n_i = pos[i] + 1
                    o[:, :, i] += np.einsum("hgj,hjd->hgd", (pg * m)[:, :, i, :n_i],
                                            v_read[t][:, :n_i])
            elif m.any():   # [Hk, G*P, width] @ [Hk, width, D]: no broadcast, BLAS
                o += np.matmul((pg * m).reshape(Hk, G * P, width),
                               v_read[t][:, :width]).reshape(Hk, G, P, D)
        out[:, t0:t1] = o.reshape(Hq, P, D).astype(np.float32).astype(np.float16)
        # the kernels' byte counters, summed over the P decode steps
        lengths = pos + 1
        vt_valid = np.where(valid[:, None], vt, 0)
        counters[0] += T * kt.size
        counters[1] += (T // 2) * int((kt >= 12).sum())
        counters[2] += (T // 2) * int((kt >= 16).sum())
        counters[3] += D * int((vt_valid > 0).sum())
        counters[4] += (D // 2) * int((vt_valid >= 12).sum())
        counters[5] += (D // 2) * int((vt_valid >= 16).sum())
        counters[6] += P * (D * nb * Hk + (0 if mode == "full" else D * nb * Hk + D * Hq * k_sel))
        counters[7] += D * Hk * int(lengths.sum())
        if keep_debug:
            for i in range(P):
                result.k_tiers.append(kt[i].copy())
                result.v_tiers.append(vt[i, :, :pos[i] + 1].copy())
    return result


def _token_tiers_to_blocks(vt, nblk):
    """Token tiers [Hk, n] → broadcastable [nblk, Hk, 64, 1] (padding tokens at tier 16)."""
    Hk, n = vt.shape
    padded = np.full((Hk, nblk * BLOCK_TOKENS), 16, np.uint8)
    padded[:, :n] = vt
    return padded.reshape(Hk, nblk, BLOCK_TOKENS).transpose(1, 0, 2)[..., None]


def _count_bytes(kt, vt, n, Hq, nblk, D, rule, estimate: bool = True):
    """Bytes read per plane, as the kernel counts them (layout.py gives bytes per tier);
    ``estimate``: the V rule ran (the V exponent maxima and the estimate's hi rows count as
    metadata; a call reading V whole reads neither)."""
    Hk = kt.shape[0]
    half_t, half_d = BLOCK_TOKENS // 2, D // 2
    c = np.zeros(len(COUNTER_NAMES), np.int64)
    c[0] = BLOCK_TOKENS * kt.size
    c[1] = half_t * int((kt >= 12).sum())
    c[2] = half_t * int((kt >= 16).sum())
    c[3] = D * int((vt > 0).sum())
    c[4] = half_d * int((vt >= 12).sum())
    c[5] = half_d * int((vt >= 16).sum())
    assert c[:3].sum() == k_bytes_per_channel_block(kt).sum()
    assert c[3:6].sum() == v_bytes_per_token(vt, D).sum()
    if rule.k_weight_margin is not None:     # two-pass K: pass 2 re-reads the hi rows of the
        c[0] += BLOCK_TOKENS * int((kt >= 12).sum())    # channels it refines
    # K exponent maxima per block and KV head; with the V rule also the V maxima and the
    # estimate's hi rows
    c[6] = D * nblk * Hk + (D * nblk * Hk + D * Hq * min(rule.topk, nblk) if estimate else 0)
    c[7] = n * D * Hk
    return c


# -------------------------------------------------------------- plain attentions (oracles)


#: Versions 5 and 6 of the values kernel scale the weights by 2^10 before splitting them.
MMA_WEIGHT_SCALE = 1024.0


def mma_weight_terms(p, special: bool = False) -> tuple:
    """The two fp16 terms in which the tensor-core values kernels (versions 5 and 6,
    cuda/akv_decode_v5.cuh) carry each softmax weight into ``mma.m16n8k16``.

    With ``x = p * 2^10`` (float32): ``hi = fp16(x)`` rounded toward zero, ``lo = fp16(x -
    hi)`` rounded to nearest, so ``lo >= 0`` and ``(hi + lo) / 2^10`` equals ``p`` within
    ``2^-21 * p + 2^-35`` (fp16 subnormals set the absolute floor). In a V block holding an
    Inf/NaN (``special``) a weight ``p > 0`` whose ``lo`` would be 0 gets the smallest fp16
    subnormal instead, so that ``Inf * hi + Inf * lo`` stays Inf.

    Parameters
    ----------
    p : array_like of float32, values in [0, 1]
        Softmax weights (``exp(s - m) / l``; the kernels never see p > 1).
    special : bool
        The block holds an exponent-31 V value.

    Returns
    -------
    (hi, lo) : float16 arrays of p's shape

    Raises
    ------
    ValueError
        A weight outside [0, 1] or not finite.
    """
    p = np.asarray(p, np.float32)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("mma_weight_terms: weights must be finite and in [0, 1]")
    x = p * np.float32(MMA_WEIGHT_SCALE)
    hi = x.astype(np.float16)
    over = np.abs(hi.astype(np.float32)) > np.abs(x)          # rounded away from zero
    hi = np.where(over, np.nextafter(hi, np.float16(0)), hi).astype(np.float16)
    lo = (x - hi.astype(np.float32)).astype(np.float16)        # exact difference, then RN
    if special:
        tiny = np.float16(2.0 ** -24)
        lo = np.where((x > 0) & (lo == 0), tiny, lo).astype(np.float16)
    return hi, lo


def float64_attention(q, K, V, scale: float | None = None) -> np.ndarray:
    """Exact decode attention in float64.

    Parameters
    ----------
    q : [query_heads, D]; K, V : [kv_heads, n, D] (any float dtype)

    Returns
    -------
    float64 [query_heads, D]
    """
    q = np.asarray(q, np.float64)
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    Hq, D = q.shape
    Hk = K.shape[0]
    G = Hq // Hk
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = np.einsum("hgd,hjd->hgj", q.reshape(Hk, G, D), K) * scale
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hgj,hjd->hgd", p, V).reshape(Hq, D)


def fp16_scores(q, K) -> np.ndarray:
    """Unscaled ``q·Kᵀ`` in plain fp16 arithmetic (see :func:`fp16_attention`).

    Parameters
    ----------
    q : float16 [query_heads, D]; K : float16 [kv_heads, n, D] (GQA: query head ``i`` meets
        KV head ``i // (query_heads // kv_heads)``)

    Returns
    -------
    float16 [query_heads, n]
    """
    q = np.asarray(q, np.float16).astype(np.float32)
    K = np.asarray(K, np.float16).astype(np.float32)
    Hq, D = q.shape
    Hk = K.shape[0]
    s = np.einsum("hgd,hjd->hgj", q.reshape(Hk, Hq // Hk, D), K)
    return s.reshape(Hq, -1).astype(np.float16)


def fp16_weights(q, K, scale: float | None = None) -> np.ndarray:
    """Softmax weights as :func:`fp16_attention` forms them (fp16 [query_heads, n]):
    fp16 scores scaled in fp16, softmax in fp32, rounded to fp16."""
    D = np.asarray(q).shape[-1]
    scale = np.float16(1.0 / np.sqrt(D) if scale is None else scale)
    s = (fp16_scores(q, K) * scale).astype(np.float16).astype(np.float32)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float16)


def fp16_weighted_sum(p, V) -> np.ndarray:
    """``p·V`` in plain fp16 arithmetic (see :func:`fp16_attention`).

    Parameters
    ----------
    p : float16 [query_heads, n]; V : float16 [kv_heads, n, D]

    Returns
    -------
    float16 [query_heads, D]
    """
    p = np.asarray(p, np.float16).astype(np.float32)
    V = np.asarray(V, np.float16).astype(np.float32)
    Hq, n = p.shape
    Hk, _, D = V.shape
    o = np.einsum("hgj,hjd->hgd", p.reshape(Hk, Hq // Hk, n), V)
    return o.reshape(Hq, D).astype(np.float16)


def fp16_attention(q, K, V, scale: float | None = None) -> np.ndarray:
    """Plain fp16 decode attention as eager PyTorch computes it on fp16 tensors.

    Scores are fp32 dot products rounded to fp16, scaled in fp16; softmax in fp32 rounded to
    fp16; the output is an fp32 sum of fp16 products rounded to fp16. The baseline the aligned
    cache's error is held against.

    Parameters
    ----------
    q : float16 [query_heads, D]; K, V : float16 [kv_heads, n, D]

    Returns
    -------
    float16 [query_heads, D]
    """
    return fp16_weighted_sum(fp16_weights(q, K, scale), V)


def relative_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN when either holds NaN)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))
