"""The bit-plane layout of the aligned KV cache: one source of truth.

Every shape, stride and byte count of the planes lives here. The CUDA launch code,
the numpy reference and the byte counters all read these functions; none re-derives
them. The layout is DESIGN.md section 3:

* fp16 bits ``b15..b0`` are split into three planes: ``hi`` = b15..b8 (one byte: sign,
  5 exponent bits, top 2 mantissa bits), ``mid`` = b7..b4 (a nibble), ``lo`` = b3..b0
  (a nibble).
* The cache is paged in blocks of :data:`BLOCK_TOKENS` = 64 tokens, addressed through a
  block table ``[batch, blocks_per_sequence]`` of physical block indices.
* K is channel-major inside a block: ``k_hi[layer, block, kv_head, d, T]`` (64 bytes per
  channel), ``k_mid``/``k_lo[layer, block, kv_head, d, T/2]``; token ``2p`` lives in the low
  nibble of byte ``p`` and token ``2p+1`` in its high nibble.
* V is token-major inside a block: ``v_hi[layer, block, kv_head, T, D]``,
  ``v_mid``/``v_lo[layer, block, kv_head, T, D/2]``; channel ``2c`` in the low nibble of byte
  ``c``, channel ``2c+1`` in the high nibble.
* Per block and channel the largest fp16 exponent field seen (subnormal and zero count as 1):
  ``k_exp_max``/``v_exp_max[layer, block, kv_head, D]`` (uint8).

A tier is the number of high-order bits read: 8 (hi), 12 (hi+mid) or 16 (all).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Tokens per cache block (DESIGN.md section 3).
BLOCK_TOKENS = 64
#: Head sizes the kernels are instantiated for.
SUPPORTED_HEAD_DIMS = (64, 128)
#: Largest GQA group (query heads per KV head) one decode CTA serves.
MAX_GQA_GROUP = 8
#: The three tiers, in bits per value.
TIERS = (8, 12, 16)
#: The exponent field of fp16 Inf/NaN.
FP16_SPECIAL_EXPONENT = 31

PLANE_NAMES = ("k_hi", "k_mid", "k_lo", "v_hi", "v_mid", "v_lo", "k_exp_max", "v_exp_max")

#: Order of the kernel's byte counters (uint64 each); see :func:`counter_names`.
COUNTER_NAMES = (
    "k_hi_bytes", "k_mid_bytes", "k_lo_bytes",
    "v_hi_bytes", "v_mid_bytes", "v_lo_bytes",
    "metadata_bytes", "values",
)


def blocks_for(tokens: int) -> int:
    """Number of 64-token blocks that hold ``tokens`` tokens (ceil division)."""
    return -(-int(tokens) // BLOCK_TOKENS)


@dataclass(frozen=True)
class PlaneLayout:
    """Shapes and sizes of the planes of one cache.

    Parameters
    ----------
    num_layers : int
        Decoder layers L.
    num_blocks : int
        Physical blocks in the pool (shared by all sequences through the block table).
    num_kv_heads : int
        KV heads per layer.
    head_dim : int
        Channels per head D, one of :data:`SUPPORTED_HEAD_DIMS`.
    """

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head_dim: expected one of {SUPPORTED_HEAD_DIMS}, got {self.head_dim}")
        for name in ("num_layers", "num_blocks", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")

    def plane_shape(self, name: str) -> tuple:
        """Shape of plane ``name`` for all layers: ``(L, blocks, kv_heads, ...)`` (uint8)."""
        T, D = BLOCK_TOKENS, self.head_dim
        inner = {
            "k_hi": (D, T), "k_mid": (D, T // 2), "k_lo": (D, T // 2),
            "v_hi": (T, D), "v_mid": (T, D // 2), "v_lo": (T, D // 2),
            "k_exp_max": (D,), "v_exp_max": (D,),
        }
        if name not in inner:
            raise KeyError(f"unknown plane {name!r}; planes are {PLANE_NAMES}")
        return (self.num_layers, self.num_blocks, self.num_kv_heads) + inner[name]

    def plane_nbytes(self, name: str) -> int:
        """Bytes of plane ``name`` for all layers."""
        return int(np.prod(self.plane_shape(name)))

    def layer_nbytes(self, name: str) -> int:
        """Bytes of plane ``name`` for one layer (the stride between layers)."""
        return self.plane_nbytes(name) // self.num_layers

    @property
    def total_nbytes(self) -> int:
        return sum(self.plane_nbytes(n) for n in PLANE_NAMES)


def k_bytes_per_channel_block(tier) -> np.ndarray:
    """Bytes read for one (block, channel) of K at ``tier``: 64, 96 or 128.

    Works elementwise on an array of tiers.
    """
    tier = np.asarray(tier)
    half = BLOCK_TOKENS // 2
    return BLOCK_TOKENS + half * (tier >= 12) + half * (tier >= 16)


def v_bytes_per_token(tier, head_dim: int) -> np.ndarray:
    """Bytes read for one token row of V at ``tier``: 0 (tier 0, skipped), D, 1.5 D or 2 D."""
    tier = np.asarray(tier)
    half = head_dim // 2
    return head_dim * (tier > 0) + half * (tier >= 12) + half * (tier >= 16)


def identity_block_table(batch: int, blocks_per_sequence: int) -> np.ndarray:
    """Block table of a contiguous cache: sequence ``b`` owns blocks ``b*n .. b*n+n-1``.

    Returns int32 ``[batch, blocks_per_sequence]``.
    """
    return np.arange(batch * blocks_per_sequence, dtype=np.int32).reshape(
        batch, blocks_per_sequence)


@dataclass(frozen=True)
class Workspace:
    """Scratch buffers of one decode-attention call, sized once at cache creation.

    The decode step allocates nothing: the cache owns these for its largest shapes.
    Shapes (all float32 unless said otherwise), with ``NB = blocks_per_sequence``:

    * ``scores [B, Hq, NB*64]`` – scaled scores q·kᵀ/√D
    * ``block_max``, ``block_sum [B, Hq, NB]`` – per-block softmax statistics;
      ``block_arg [B, Hq, NB]`` int32 – token of the block maximum
    * ``stats [B, Hq, 2]`` – global max m and sum l
    * ``o_est [B, Hq, D]`` – the V-side output estimate (DESIGN.md section 4)
    * ``partial [B, Hq, NB, D]`` – per-split partial outputs, already normalised
    * ``split_stats [B, Hq, NB, 2]`` – each split's own max and sum (the V-whole path, whose
      partials are normalised per split; docs/design.md)
    """

    batch: int
    num_query_heads: int
    head_dim: int
    blocks_per_sequence: int

    def shapes(self) -> dict:
        B, H, D, NB = self.batch, self.num_query_heads, self.head_dim, self.blocks_per_sequence
        return {
            "scores": ((B, H, NB * BLOCK_TOKENS), np.float32),
            "block_max": ((B, H, NB), np.float32),
            "block_sum": ((B, H, NB), np.float32),
            "block_arg": ((B, H, NB), np.int32),
            "stats": ((B, H, 2), np.float32),
            "o_est": ((B, H, D), np.float32),
            "partial": ((B, H, NB, D), np.float32),
            "split_stats": ((B, H, NB, 2), np.float32),
        }
