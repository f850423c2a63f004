"""The CUDA backend of :class:`~akv_runtime.cache.AlignedKVCache`: buffers and launches.

Owns the device buffers (planes of all layers, lengths, block table, the decode workspace and
the byte counters, all sized at creation so the decode step allocates nothing) and launches
the kernels of ``cuda/akv.cu`` (and, on compute capability 9.0, the fused kernel of
``cuda/akv_fused.cu``) on the caller's stream. Grid and block shapes mirror the
header comment of each kernel. Argument checks happen in :mod:`akv_runtime.cache` before any
call reaches this module.
"""

from __future__ import annotations

import ctypes
import os
import warnings

import numpy as np

from . import driver
from .driver import f32, i32, ptr
from .layout import (BLOCK_TOKENS, COUNTER_NAMES, PLANE_NAMES, SUPPORTED_HEAD_DIMS, Workspace,
                     blocks_for)
from .memory import DeviceArray, allocate_arrays

SCORE_THREADS = 128
ESTIMATE_THREADS = 256
#: Longest sequence (in 64-token blocks) the short estimate kernel serves, and the query
#: heads (warps) per CTA of that kernel (kEstimateSelectAbove, kShortEstimateWarps in
#: cuda/akv.cu).
SHORT_ESTIMATE_BLOCKS = 64
SHORT_ESTIMATE_HEADS = 4
#: The short estimate kernel runs when the 256-thread one would have more than this many
#: CTAs (query heads x batch) per multiprocessor (measured crossover, see
#: CudaBackend._estimate_launch).
SHORT_ESTIMATE_MIN_CTAS_PER_SM = 4
VALUE_THREADS = 128
#: The fused decode kernel (cuda/akv_fused.cu: kFusedThreads, kFusedMaxBlocks, kFusedMaxBpc):
#: threads per CTA, the longest sequence it serves (64-token blocks) and the most blocks one
#: CTA of a cluster owns; it needs thread-block clusters (compute capability 9.0).
FUSED_THREADS = 512
FUSED_MAX_BLOCKS = 64
FUSED_MAX_BPC = 8
FUSED_MIN_CAPABILITY = (9, 0)
FUSED_CLUSTER_SIZES = (8, 16)
#: The fused kernel runs by default only for batches of at most this many clusters
#: (sequences x KV heads; see CudaBackend._use_fused), and only on calls that apply the V
#: rule: with the cache's default v_rule="auto" such small calls read V whole instead
#: (docs/design.md), so by default it runs only under v_rule="always".
FUSED_MAX_CLUSTERS = 4
#: Decode kernel versions (cuda/akv.cu: 1, cuda/akv_decode_v2.cuh: 2, cuda/akv_decode_v3.cuh:
#: 3 and 4, cuda/akv_decode_v5.cuh: 5 and 6, cuda/akv_decode_v7.cuh: 7); $AKV_DECODE_VERSION
#: picks one for benchmarks and tests. docs/perf-notes.md compares them. Version 4 exists for
#: GQA groups up to 4; larger groups run version 3. Versions 5 and 6 run the values phase on
#: tensor cores (6: at head_dim 128 two warps share a block's channels, 8 CTAs per SM);
#: version 7 also the scores phase (q·Kᵀ), with version 6's values kernel; version 8
#: (cuda/akv_decode_v8.cuh) is version 7 with one warp per 64-token block in the scores
#: kernel (no cross-warp partial sums), and launches version 7's values kernel.
DECODE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
#: Warps of one version-8 scores CTA, each owning whole blocks of the CTA's split.
V8_WARPS = 4


def default_decode_version(group: int, head_dim: int) -> int:
    """The decode kernel version a cache of GQA group size ``group`` (query heads per KV
    head) and ``head_dim`` (one of layout.SUPPORTED_HEAD_DIMS) runs unless
    $AKV_DECODE_VERSION says otherwise: 3 for MHA, 7 for GQA groups.

    Measured on the H200 (docs/benchmarks.md, 2026-11-29, seventh session, commit 8e77e05,
    `bash scripts/gpu_check.sh --versions 3,7 --rule tuned`): MHA (group 1) is fastest on
    version 3 at every MHA shape of the grid but two (8 x 16k: 0.407 against version 7's
    0.428 ms; 1 x 4k: 0.032 against 0.034); version 7 was ahead at 8 x 32k (0.837 against
    0.923; those timings are bimodal between runs) and 32 x 16k (1.634 against 1.656).
    Version 7 (tensor cores for q·Kᵀ and p·V) was the fastest of versions 1-7 at every GQA
    shape timed at batch >= 8: groups of 3 (SmolLM2, 8 x 16k: 0.050 ms against version 3's
    0.059), 4 (Llama-3-8B, 8 x 16k: 0.161 against 0.235) and 8 (Llama-3-70B's shape,
    8 x 16k: 0.211 against 0.423, same-call runs of the seventh session's call 6); at
    batch 1 it wins or ties except SmolLM2 1 x 16k (0.030 against 0.027). Groups 2 and 5-7
    run it too (GPU tests cover 2-8; no timing at 2, 5-7).

    Version 8 (one warp per block in the scores kernel, version 7's values kernel) was
    measured against version 7 in the eleventh session (docs/perf-notes.md; same-call
    runs, H200): SmolLM2 (group 3, head_dim 64) 32 x 16k 0.126-0.127 against 0.128-0.131 ms
    (11 runs), 8 x 16k 0.047-0.048 against 0.048 (6 runs), 8 x 4k 0.024-0.027 against
    0.025-0.027, 32 x 4k and 1 x 16k equal; Llama-3-8B (group 4, head_dim 128) 8 x 16k 0.163-0.164 against
    0.159-0.160, 1 x 4k 0.027-0.028 against 0.024, 8 x 4k equal. So version 8 ran at head
    dim 64 in the eleventh session, version 7 at 128.

    The twelfth session's A fragments built straight from the planes (akv7::kstep_mma,
    shared by versions 7 and 8) left version 8 spilling a little at 80 registers, and the
    full grid of commit 05dc17c (docs/benchmarks.md, `bash scripts/gpu_check.sh --versions
    3,7,8 --rule tuned`) has version 7 ahead or equal at every SmolLM2 shape (group 3, head
    dim 64) but 8 x 32k (0.0763 against 0.0761 ms): 32 x 32k 0.220 against 0.226, 32 x 16k
    0.125 against 0.126, 8 x 16k 0.0463 against 0.0469, 1 x 16k 0.0255 against 0.0265. So
    version 7 for every GQA group and head_dim again.

    Raises ValueError unless ``group`` is a positive integer and ``head_dim`` a supported
    head_dim."""
    if group < 1:
        raise ValueError(f"group: expected a positive GQA group size, got {group}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    return 3 if group == 1 else 7


def _env_int(name: str, allowed, expected: str) -> int | None:
    """The integer in ``$name`` if it is in ``allowed``; None when unset or empty. Raises
    ValueError naming the variable, with ``expected``, for anything else."""
    env = os.environ.get(name, "").strip()
    if not env:
        return None
    try:
        value = int(env)
    except ValueError:
        value = None
    if value not in allowed:
        raise ValueError(f"${name}: expected {expected}, got {env!r}")
    return value


def env_decode_version() -> int | None:
    """$AKV_DECODE_VERSION: the decode kernel version every new CUDA cache runs (benchmarks,
    tests), or None when unset or empty.

    Raises ValueError naming the variable unless it is one of DECODE_VERSIONS."""
    return _env_int("AKV_DECODE_VERSION", DECODE_VERSIONS, f"one of {DECODE_VERSIONS}")


def env_fused():
    """$AKV_FUSED: the CUDA backend's use of the fused kernel (CudaBackend.fused): unset,
    empty or "1": where measured faster (True); "0": never (False); "always": wherever it
    serves (measurements). Either way only on calls that apply the V rule (not on the
    V-whole path: full mode, or v_rule "auto" at its small sizes).

    Raises ValueError naming the variable for anything else."""
    env = os.environ.get("AKV_FUSED", "").strip()
    choices = {"": True, "1": True, "0": False, "always": "always"}
    if env not in choices:
        raise ValueError(f"$AKV_FUSED: expected 0, 1 or always, got {env!r}")
    return choices[env]


def env_whole_kernel() -> str:
    """$AKV_WHOLE_KERNEL: the V-whole path's kernels (CudaBackend.whole_kernel) for versions
    >= 3, one of WHOLE_KERNELS: unset, empty or "flash": the flash kernel
    (akv_decode_flash_whole_v7_*: one pass over a split, each block's scores straight into
    its p·V) and the combine; "split": the split kernel (akv_decode_split_whole_v7_*: a
    split's scores, then its values) and the combine; "three": the version's scores and
    values kernels and the combine (two launches, two, three; measurements).

    Raises ValueError naming the variable for anything else."""
    if os.environ.get("AKV_SPLIT_WHOLE", "").strip():
        warnings.warn("$AKV_SPLIT_WHOLE is no longer read: $AKV_WHOLE_KERNEL (flash, split or "
                      "three) picks the V-whole path's kernels", stacklevel=2)
    env = os.environ.get("AKV_WHOLE_KERNEL", "").strip()
    if env == "":
        return "flash"
    if env not in WHOLE_KERNELS:
        raise ValueError(f"$AKV_WHOLE_KERNEL: expected one of {', '.join(WHOLE_KERNELS)}, "
                         f"got {env!r}")
    return env


def env_split_blocks() -> int | None:
    """$AKV_SPLIT_BLOCKS: blocks per CTA for decode versions >= 3 instead of the automatic
    choice (every split-KV kernel, each capped at its own maximum: MAX_SPLIT_BLOCKS for the
    values and split kernels, MAX_SCORE_SPLIT_BLOCKS and MAX_FLASH_SPLIT_BLOCKS for the
    scores and flash kernels; tests and experiments), or None when unset or empty.

    Raises ValueError naming the variable unless it is 1..MAX_FLASH_SPLIT_BLOCKS."""
    return _env_int("AKV_SPLIT_BLOCKS", range(1, MAX_FLASH_SPLIT_BLOCKS + 1),
                    f"1..{MAX_FLASH_SPLIT_BLOCKS} blocks per CTA")


MAX_GROUP_V4 = 4
#: Version 4's pipeline stages (scores, values) per head_dim; cuda/akv.cu instantiates the
#: same numbers. A stage holds one block's three planes: 2 * 64 * head_dim bytes.
STAGES_V4 = {128: (4, 6), 64: (6, 8)}
#: Versions >= 3: most blocks one CTA of the values kernels serves (kMaxSplit in
#: akv_decode_v3.cuh; the combine step sums one partial per split) and of the scores kernels
#: (kMaxScoreSplit; their output is per block, so their split is free to differ).
MAX_SPLIT_BLOCKS = 8
MAX_SCORE_SPLIT_BLOCKS = 16
#: The flash kernel's most blocks per CTA (its tiers of K are kept per block of the split,
#: kMaxScoreSplit; its output is one partial per split).
MAX_FLASH_SPLIT_BLOCKS = 16
#: The V-whole path's kernels (CudaBackend.whole_kernel, $AKV_WHOLE_KERNEL): the flash
#: kernel, the split kernel, or the version's three launches.
WHOLE_KERNELS = ("flash", "split", "three")
#: The split model's cost of a CTA's prologue (block table, exponent maxima, tiers), in
#: units of the time one block of planes takes (docs/perf-notes.md, fifth session, fitted to
#: the forced-split timings of the session before).
SPLIT_PROLOGUE_BLOCKS = 0.5

#: Threads per output channel of the combine kernel when it spreads the four running sums
#: over threads (kCombineChains in cuda/akv.cu); see :func:`combine_chains`.
COMBINE_CHAINS = 4


def combine_chains(splits: int, ctas: int, head_dim: int, multiprocessors: int) -> int:
    """Threads per output channel of the combine kernel: 4 (one per running sum) when the
    sequences have more than 16 splits and the ``ctas`` x 4 x ``head_dim`` threads fit in one
    wave (2048 per multiprocessor), else 1 (a thread keeps all four sums). The output is the
    same bits either way (cuda/akv.cu). Measured on the H200 (docs/perf-notes.md, eighth
    session): four per channel cut the combine at batch 1 × 128k from 6.6 to 3.7-5.6 us (two
    grids) and cost 1-2 us at batch 32, where 1024 CTAs of 512 threads fill several waves."""
    if splits > 16 and ctas * COMBINE_CHAINS * head_dim <= 2048 * multiprocessors:
        return COMBINE_CHAINS
    return 1


def choose_split(nblk: int, rows: int, slots: int, cap: int) -> int:
    """Blocks per CTA for a split-KV kernel over ``rows`` (KV heads x sequences) rows of
    ``nblk`` 64-token blocks, when ``slots`` CTAs fit on the GPU at once (multiprocessors x
    resident CTAs per multiprocessor), at most ``cap``.

    Model (docs/perf-notes.md, fifth session): CTAs run in waves of ``slots``, and a CTA
    takes ``split + SPLIT_PROLOGUE_BLOCKS`` block-times, so a launch takes
    ``ceil(CTAs / slots) * (split + SPLIT_PROLOGUE_BLOCKS)``. The smallest such time wins;
    among splits within 2 % of it the largest (fewer CTAs, fewer partials). This is what
    keeps a launch from ending in a nearly empty wave: at batch 1 x 16k (MHA, 32 KV heads,
    6 scores CTAs per multiprocessor on 132) 8 blocks per CTA give 1024 CTAs, 1.29 waves;
    11 give 768, one wave (measured: that phase 0.050 -> 0.041 ms). The model overstates a
    partly filled last wave in places: GQA 8 x 4k's scores phase lost 4 % to it.

    Returns an int in 1 .. min(cap, nblk). Raises ValueError unless every argument is a
    positive integer."""
    for name, value in (("nblk", nblk), ("rows", rows), ("slots", slots), ("cap", cap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    costs = {s: -(-rows * -(-nblk // s) // slots) * (s + SPLIT_PROLOGUE_BLOCKS)
             for s in range(1, min(cap, nblk) + 1)}
    best = min(costs.values())
    return max(s for s, c in costs.items() if c <= best * 1.02)


def fused_smem_bytes(head_dim: int, group: int, bpc: int) -> int:
    """Dynamic shared memory (bytes) of the fused kernel for ``bpc`` blocks per CTA, as
    cuda/akv_fused.cu lays it out: the planes of its blocks (2 x head_dim x 64 bytes each;
    at least the values' reduction, token groups x group x head_dim floats), the scores of
    its tokens (group x bpc x 64 floats) and the partial sums (the scores' of four blocks x
    four channel quarters, 16 x group x 65 floats, then O_est's, one float per thread)."""
    token_groups = FUSED_THREADS // (head_dim // 4)
    planes = max(bpc * 2 * head_dim * BLOCK_TOKENS, token_groups * group * head_dim * 4)
    partials = max(16 * group * (BLOCK_TOKENS + 1), FUSED_THREADS)
    return planes + group * bpc * BLOCK_TOKENS * 4 + partials * 4


def fused_geometry(nblk: int, cluster: int | None = None) -> tuple[int, int]:
    """(CTAs per cluster, blocks per CTA) of the fused kernel for sequences of at most
    ``nblk`` blocks (1..FUSED_MAX_BLOCKS): clusters of 16 above 32 blocks, else of 8, unless
    ``cluster`` (8 or 16) is given; blocks per CTA = ceil(nblk / cluster), at most
    FUSED_MAX_BPC. Raises ValueError outside those ranges."""
    if not 1 <= nblk <= FUSED_MAX_BLOCKS:
        raise ValueError(f"nblk: the fused kernel serves 1..{FUSED_MAX_BLOCKS} blocks, got {nblk}")
    if cluster is None:
        cluster = 16 if nblk > 32 else 8
    if cluster not in FUSED_CLUSTER_SIZES:
        raise ValueError(f"cluster: expected one of {FUSED_CLUSTER_SIZES}, got {cluster!r}")
    bpc = -(-nblk // cluster)
    if bpc > FUSED_MAX_BPC:
        raise ValueError(f"cluster: {cluster} CTAs of at most {FUSED_MAX_BPC} blocks cannot "
                         f"serve {nblk} blocks")
    return cluster, bpc


def resolve_stream(stream, info) -> int:
    """The stream to launch on: the caller's, else torch's current stream for torch
    tensors, else the legacy default stream (0)."""
    if stream is not None:
        handle = getattr(stream, "cuda_stream", stream)  # a torch.cuda.Stream works too
        return int(handle)
    if info.is_torch:
        import torch
        return int(torch.cuda.current_stream(info.obj.device).cuda_stream)
    return 0


class CudaBackend:
    """Device buffers and kernel launches for one cache (see module docstring)."""

    name = "cuda"

    def __init__(self, cache, device_id: int = 0):
        self.cache = cache
        self.dev = driver.get_device(device_id)
        self.module = driver.load_module(self.dev)
        self.device_name = (f"{self.dev.name} (compute capability "
                            f"{self.dev.compute_capability[0]}.{self.dev.compute_capability[1]}, "
                            f"cubin {self.module.arch})")
        fn = self.module.function
        self.k_append = fn("akv_append")
        self.k_estimate = fn("akv_decode_estimate")
        self.k_estimate_short = fn("akv_decode_estimate_short")
        self.k_combine = fn("akv_decode_combine")
        self.k_combine_rescale = fn("akv_decode_combine_rescale")
        group = cache.num_query_heads // cache.num_kv_heads
        self.default_decode_version = default_decode_version(group, cache.head_dim)
        env_version = env_decode_version()
        self.set_decode_version(self.default_decode_version if env_version is None
                                else env_version)
        self.forced_split = env_split_blocks()
        #: akv_decode_estimate_short where it is faster (True), wherever it serves
        #: ("always"; tests and measurements), or never (False); see _estimate_launch
        self.short_estimate = True
        self._splits: dict = {}
        #: the fused one-launch kernel (cuda/akv_fused.cu) where it serves and is faster
        #: (True), wherever it serves ("always"; tests and measurements) or never (False);
        #: see _use_fused. ``fused_cluster`` forces its cluster size (8 or 16).
        self.fused = env_fused()
        self.fused_cluster = None
        #: the V-whole path's kernels, one of WHOLE_KERNELS: "flash" (the flash kernel and the
        #: combine), "split" (the split kernel and the combine) or "three" (the version's
        #: scores and values kernels and the combine); see decode_phases
        self.whole_kernel = env_whole_kernel()
        self.k_fused, self.fused_max_cluster = self._load_fused(cache)

        layout = cache.layout
        self.layer_nbytes = {n: layout.layer_nbytes(n) for n in PLANE_NAMES}
        self._plane_buffer, self.planes = allocate_arrays(
            self.dev, {n: (layout.plane_shape(n), np.uint8) for n in PLANE_NAMES})
        specs = dict(Workspace(cache.batch_size, cache.num_query_heads, cache.head_dim,
                               cache.blocks_per_sequence).shapes())
        specs["lengths"] = ((cache.num_layers, cache.batch_size), np.int32)
        # akv_append's per-sequence arrival counts (zero between launches, cuda/akv.cu)
        specs["append_arrive"] = ((cache.num_layers, cache.batch_size), np.int32)
        specs["block_table"] = (cache.block_table.shape, np.int32)
        specs["counters"] = ((len(COUNTER_NAMES),), np.uint64)
        self._ws_buffer, self.ws = allocate_arrays(self.dev, specs)
        driver.copy_to_device(self.ws["block_table"].ptr, cache.block_table)
        self._debug_buffer = None
        self._debug = None
        self._plans: dict = {}
        self._append_plans: dict = {}

    def _load_fused(self, cache) -> tuple:
        """(kernel, largest usable cluster size) of the fused kernel for this cache's head_dim
        and group, or (None, 0) where it cannot run: below compute capability 9.0, without
        akv_fused.cubin for the device (a build older than the kernel), or where the driver
        refuses its shared memory or clusters (another architecture's limits). Clusters of
        16 CTAs only where cuOccupancyMaxActiveClusters says one fits; else 8. The four
        launches serve every call then."""
        if tuple(self.dev.compute_capability) < FUSED_MIN_CAPABILITY:
            return None, 0
        D, G = cache.head_dim, cache.num_query_heads // cache.num_kv_heads
        try:
            fn = driver.load_module(self.dev, "akv_fused").function(f"akv_decode_fused_d{D}_g{G}")
            driver.set_max_dynamic_shared(fn, fused_smem_bytes(D, G, FUSED_MAX_BPC))
            driver.allow_non_portable_cluster(fn)
            fits = {cl: driver.max_active_clusters(
                        fn, cl, FUSED_THREADS,
                        fused_smem_bytes(D, G, -(-FUSED_MAX_BLOCKS // cl)))
                    for cl in FUSED_CLUSTER_SIZES}
        except (driver.CudaError, driver.NoCubinError):
            return None, 0
        usable = [cl for cl in FUSED_CLUSTER_SIZES if fits[cl] > 0]
        return (fn, max(usable)) if usable else (None, 0)

    def set_decode_version(self, version: int) -> None:
        """Use decode kernels of ``version`` (one of DECODE_VERSIONS; the same tiers and bytes
        read, outputs equal up to fp32 summation order; different speed).

        Raises ValueError for an unknown version."""
        if version not in DECODE_VERSIONS:
            raise ValueError(f"decode version: expected one of {DECODE_VERSIONS}, got {version}")
        D, G = self.cache.head_dim, self.cache.num_query_heads // self.cache.num_kv_heads
        if version == 4 and G > MAX_GROUP_V4:
            version = 3
        fn = self.module.function
        suffix = f"d{D}" if version == 1 else f"v{version}_d{D}_g{G}"
        self.k_scores = fn(f"akv_decode_scores_{suffix}")
        values_suffix = f"v7_d{D}_g{G}" if version == 8 else suffix
        self.k_values = fn(f"akv_decode_values_{values_suffix}")
        # the V-whole path's values kernel (versions >= 3; docs/design.md)
        self.k_values_whole = (fn(f"akv_decode_values_whole_{values_suffix}")
                               if version >= 3 else None)
        # the V-whole path's split kernel: version 7's scores and V-whole values kernels in
        # one CTA (akv7::split_whole), for every version >= 3
        self.k_split_whole = (fn(f"akv_decode_split_whole_v7_d{D}_g{G}")
                              if version >= 3 else None)
        # the V-whole path's flash kernel (akv7::flash_whole): one pass, K and V of a block
        # together, an online softmax over the split; the split kernel's arguments
        self.k_flash_whole = (fn(f"akv_decode_flash_whole_v7_d{D}_g{G}")
                              if version >= 3 else None)
        self.scores_smem = self.values_smem = 0
        if version == 4:
            stage = 2 * BLOCK_TOKENS * D
            score_stages, value_stages = STAGES_V4[D]
            self.scores_smem = score_stages * stage
            self.values_smem = max(value_stages * stage, 4 * (D // 16) * 16 * G * 4)
            driver.set_max_dynamic_shared(self.k_scores, self.scores_smem)
            driver.set_max_dynamic_shared(self.k_values, self.values_smem)
            driver.set_max_dynamic_shared(self.k_values_whole, self.values_smem)
        self.scores_per_sm = max(1, driver.max_active_blocks(self.k_scores, SCORE_THREADS,
                                                             self.scores_smem))
        self.values_per_sm = max(1, driver.max_active_blocks(self.k_values, VALUE_THREADS,
                                                             self.values_smem))
        self.split_whole_per_sm = (
            max(1, driver.max_active_blocks(self.k_split_whole, SCORE_THREADS, 0))
            if self.k_split_whole is not None else 1)
        self.flash_whole_per_sm = (
            max(1, driver.max_active_blocks(self.k_flash_whole, SCORE_THREADS, 0))
            if self.k_flash_whole is not None else 1)
        self.decode_version = version

    def splits(self, nblk: int, num_kv_heads: int, batch: int) -> tuple[int, int]:
        """Blocks per CTA of the scores kernel and of the values kernel, for sequences of at
        most ``nblk`` blocks: 1 for versions 1-2; for versions >= 3 :func:`choose_split` with
        each kernel's own occupancy (resident CTAs per multiprocessor, from the driver), at
        most MAX_SCORE_SPLIT_BLOCKS and MAX_SPLIT_BLOCKS; version 8's scores split is
        V8_WARPS times a warp's share, :func:`choose_split` over ceil(nblk / V8_WARPS)
        blocks with a cap of MAX_SCORE_SPLIT_BLOCKS / V8_WARPS (so at least 4, possibly
        more than ``nblk``: a warp without a block idles). ``forced_split``
        ($AKV_SPLIT_BLOCKS; tests and experiments) replaces both: an int for both kernels,
        or a (scores, values) pair, each capped by its kernel's maximum."""
        if self.decode_version < 3:
            return 1, 1
        if self.forced_split is not None:
            forced = self.forced_split
            score, value = forced if isinstance(forced, tuple) else (forced, forced)
            return min(MAX_SCORE_SPLIT_BLOCKS, score), min(MAX_SPLIT_BLOCKS, value)
        key = (nblk, num_kv_heads, batch, self.decode_version)
        found = self._splits.get(key)      # a decode step costs a dict lookup, not the model
        if found is None:
            rows = num_kv_heads * batch
            sms = self.dev.multiprocessors
            if self.decode_version == 8:
                # four warps per CTA, each a block at a time: the model's unit is a warp's
                # share, V8_WARPS blocks of the split
                per_warp = choose_split(-(-nblk // V8_WARPS), rows, sms * self.scores_per_sm,
                                        MAX_SCORE_SPLIT_BLOCKS // V8_WARPS)
                score = min(MAX_SCORE_SPLIT_BLOCKS, V8_WARPS * per_warp)
            else:
                score = choose_split(nblk, rows, sms * self.scores_per_sm,
                                     MAX_SCORE_SPLIT_BLOCKS)
            found = self._splits[key] = (
                score, choose_split(nblk, rows, sms * self.values_per_sm, MAX_SPLIT_BLOCKS))
        return found

    def whole_split(self, nblk: int, num_kv_heads: int, batch: int) -> int:
        """Blocks per CTA of the V-whole path's one-CTA kernel (:attr:`whole_kernel`: the
        flash kernel, akv_decode_flash_whole_v7_*, or the split kernel,
        akv_decode_split_whole_v7_*) for sequences of at most ``nblk`` blocks:
        :func:`choose_split` with that kernel's own occupancy, at most
        MAX_FLASH_SPLIT_BLOCKS (the flash kernel) or MAX_SPLIT_BLOCKS (the split kernel's
        values part, kMaxSplit); ``forced_split``'s values split where one is forced."""
        flash = self.whole_kernel == "flash"
        cap = MAX_FLASH_SPLIT_BLOCKS if flash else MAX_SPLIT_BLOCKS
        if self.forced_split is not None:
            forced = self.forced_split
            return min(cap, forced[1] if isinstance(forced, tuple) else forced)
        key = (nblk, num_kv_heads, batch, self.whole_kernel)
        found = self._splits.get(key)
        if found is None:
            per_sm = self.flash_whole_per_sm if flash else self.split_whole_per_sm
            found = self._splits[key] = choose_split(
                nblk, num_kv_heads * batch, self.dev.multiprocessors * per_sm, cap)
        return found

    # ------------------------------------------------------------------ helpers
    def check_device(self, name, info):
        if info.device != "cuda":
            raise ValueError(f"{name}: the cuda backend takes device arrays (torch CUDA "
                             f"tensors or DLPack CUDA arrays), got a {info.device} array")
        if info.device_id != self.dev.ordinal:
            raise ValueError(f"{name}: on CUDA device {info.device_id}, the cache is on "
                             f"device {self.dev.ordinal}")
        if info.strides[-1] != 1:
            raise ValueError(f"{name}: the channel (last) axis must be contiguous, stride "
                             f"{info.strides[-1]}")
        if info.ptr % 4:
            raise ValueError(f"{name}: the data pointer must be 4-byte aligned")

    def _plane_ptr(self, name, layer):
        return self.planes[name].ptr + layer * self.layer_nbytes[name]

    def _lengths_ptr(self, layer):
        return self.ws["lengths"].ptr + layer * self.cache.batch_size * 4

    # ------------------------------------------------------------------ append
    def append(self, layer, k_info, v_info, starts, stream, counts=None):
        s = resolve_stream(stream, k_info)
        B, Hk, S, D = k_info.shape
        if counts is not None:
            self._append_ragged(layer, k_info, v_info, counts, s)
            return
        plan = self._append_plans.get(layer)
        if plan is None:
            plan = self._append_plans[layer] = self._append_plan(layer)
        plan.k_ptr.value, plan.v_ptr.value, plan.count.value = k_info.ptr, v_info.ptr, S
        for slot, value in zip(plan.strides, k_info.strides[:3] + v_info.strides[:3]):
            slot.value = value
        driver.launch_packed(self.k_append, (blocks_for(S) + 1, Hk, B), (D,), plan.append, s)

    def _append_ragged(self, layer, k_info, v_info, counts, stream):
        """``append`` with a token count per sequence: one ``akv_append`` launch per
        sequence b with counts[b] > 0, on sequence b's rows of every per-sequence array (K/V,
        lengths, arrival counts, block table: the pointers offset by b, grid z = 1), so the
        kernel is the uniform append's. A prefill's cost, not a decode step's: the arguments
        are packed per launch."""
        D, Hk = self.cache.head_dim, self.cache.num_kv_heads
        strides = k_info.strides[:3] + v_info.strides[:3]
        k_sb, v_sb = strides[0], strides[3]
        item = 2                                        # bytes per fp16 element
        for b, count in enumerate(counts):
            count = int(count)
            if count == 0:
                continue
            args = self._append_args(
                layer, ptr(k_info.ptr + b * k_sb * item), ptr(v_info.ptr + b * v_sb * item),
                [ctypes_i64(x) for x in strides], i32(count), b)
            driver.launch(self.k_append, (blocks_for(count) + 1, Hk, 1), (D,), args, stream)

    def _append_args(self, layer, k_ptr, v_ptr, strides, count, first=0):
        """``akv_append``'s arguments (ctypes objects, in its order) for ``layer``, from
        sequence ``first`` on: the K/V pointers, their six element strides and the token
        count as given, the per-sequence arrays (lengths, arrival counts, block-table rows)
        offset to sequence ``first``."""
        cache = self.cache
        bps = cache.blocks_per_sequence
        p = {n: ptr(self._plane_ptr(n, layer)) for n in PLANE_NAMES}
        return [
            k_ptr, v_ptr, *strides, count, ptr(self._lengths_ptr(layer) + 4 * first),
            ptr(self.ws["append_arrive"].ptr + (layer * cache.batch_size + first) * 4),
            ptr(self.ws["block_table"].ptr + 4 * first * bps), i32(bps),
            p["k_hi"], p["k_mid"], p["k_lo"], p["v_hi"], p["v_mid"], p["v_lo"],
            p["k_exp_max"], p["v_exp_max"], i32(cache.num_kv_heads), i32(cache.head_dim)]

    def _append_plan(self, layer):
        """Packed arguments of ``akv_append`` for one layer; the per-call
        values (K/V pointers and strides, token count) are rewritten by :meth:`append`."""
        plan = _DecodePlan()
        plan.k_ptr, plan.v_ptr, plan.count = ptr(0), ptr(0), i32(0)
        plan.strides = [ctypes_i64(0) for _ in range(6)]
        plan.pack("append", self._append_args(layer, plan.k_ptr, plan.v_ptr, plan.strides,
                                              plan.count))
        return plan

    # ------------------------------------------------------------------ attend
    def attend(self, layer, q_info, out_info, mode, rule, stream, count, debug, v_whole=False):
        s = resolve_stream(stream, q_info)
        if out_info is None:
            out_obj, out_ptr = self._new_output(q_info)
        else:
            out_obj, out_ptr = out_info.obj, out_info.ptr
        k_map = v_map = 0
        if debug:
            k_map, v_map = self._debug_maps(s)
        for _, launch in self.decode_phases(layer, q_info, out_ptr, mode, rule, s, count,
                                            k_map, v_map, v_whole):
            launch()
        if not debug:
            return out_obj
        return out_obj, self._debug_info(layer, s, whole=mode == "full" or bool(v_whole))

    def decode_phases(self, layer, q_info, out_ptr, mode, rule, stream, count=False,
                      k_map=0, v_map=0, v_whole=False) -> list:
        """The decode launches as ``(name, callable)`` in order (DESIGN.md section 5): the
        four phases (scores, estimate, values, combine), or the one fused launch where
        :meth:`_use_fused` says so (cuda/akv_fused.cu). With V read whole (``full`` mode, or
        ``v_whole``: an aligned call left out of the V rule, ``reference.v_rule_applies``)
        versions >= 3 run the V-whole path (:attr:`whole_kernel`): two launches, the flash
        kernel (akv_decode_flash_whole_v7_*, the default: one pass over a split, an online
        softmax) or the split kernel (akv_decode_split_whole_v7_*: a split's scores, then its
        values normalised by the split's own statistics, in one CTA), then
        akv_decode_combine_rescale; or three (the version's scores kernel,
        akv_decode_values_whole_*, the combine; docs/design.md);
        versions 1 and 2 run their four launches with V at tier 16 (the estimate only for
        the statistics, uncounted).

        :meth:`attend` runs them all; the benchmark also times each alone (each reads only
        what earlier phases left in the workspace, so repeating one is harmless).
        The argument arrays are packed once per (layer, mode, rule, counting, debug maps,
        kernel version, V-whole path or not) and only the per-call values (q, its strides,
        the output, the splits) are rewritten in place, so a decode step costs four driver
        calls (two or three on the V-whole path, one fused) and little Python.
        """
        cache = self.cache
        B, Hq, D = q_info.shape
        Hk = cache.num_kv_heads
        nblk = blocks_for(int(cache._lengths[layer].max()))
        go = driver.launch_packed
        whole = mode == "full" or bool(v_whole)
        if not whole and self._use_fused(nblk, Hk, B):
            plan = self._plan(layer, mode, rule, count, k_map, v_map, fused=True)
            plan.q_ptr.value, plan.out_ptr.value = q_info.ptr, out_ptr
            plan.q_sb.value, plan.q_sh.value = q_info.strides[0], q_info.strides[1]
            cluster, bpc = fused_geometry(max(nblk, 1), self.fused_cluster or
                                          (8 if self.fused_max_cluster < 16 else None))
            plan.bpc.value = bpc
            smem = fused_smem_bytes(D, Hq // Hk, bpc)
            return [("fused", lambda: go(self.k_fused, (cluster, Hk, B), (FUSED_THREADS,),
                                         plan.fused, stream, smem, cluster))]
        # the V-whole path in two launches (the flash or the split kernel, then the combine)
        # takes that kernel's own split for both of its phases
        split_kernel = whole and self.decode_version >= 3 and self.whole_kernel != "three"
        if split_kernel:
            score_split = split = self.whole_split(nblk, Hk, B)
        else:
            score_split, split = self.splits(nblk, Hk, B)
        score_splits, splits = -(-nblk // score_split), -(-nblk // split)
        plan = self._plan(layer, mode, rule, count, k_map, v_map,
                          whole="split" if split_kernel else whole)
        plan.q_ptr.value, plan.out_ptr.value = q_info.ptr, out_ptr
        plan.score_split.value, plan.split.value = score_split, split
        plan.q_sb.value, plan.q_sh.value = q_info.strides[0], q_info.strides[1]
        chains = combine_chains(splits, Hq * B, D, self.dev.multiprocessors)
        scores = ("scores", lambda: go(self.k_scores, (score_splits, Hk, B), (SCORE_THREADS,),
                                       plan.scores, stream, self.scores_smem))
        if whole and self.decode_version >= 3:
            rescale = ("combine", lambda: go(self.k_combine_rescale, (Hq, B), (chains * D,),
                                             plan.combine, stream))
            if split_kernel:
                one = (self.k_flash_whole if self.whole_kernel == "flash"
                       else self.k_split_whole)
                return [(self.whole_kernel, lambda: go(one, (splits, Hk, B), (SCORE_THREADS,),
                                                       plan.split_whole, stream, 0)),
                        rescale]
            return [
                scores,
                ("values", lambda: go(self.k_values_whole, (splits, Hk, B), (VALUE_THREADS,),
                                      plan.values, stream, self.values_smem)),
                rescale,
            ]
        estimate = self._estimate_launch(nblk, Hq, B)
        return [
            scores,
            ("estimate", lambda: go(*estimate, plan.estimate, stream)),
            ("values", lambda: go(self.k_values, (splits, Hk, B), (VALUE_THREADS,),
                                  plan.values, stream, self.values_smem)),
            ("combine", lambda: go(self.k_combine, (Hq, B), (chains * D,), plan.combine,
                                   stream)),
        ]

    def _use_fused(self, nblk: int, Hk: int, B: int) -> bool:
        """Whether a decode call that applies the V rule (:meth:`decode_phases` asks only
        then), over sequences of at most ``nblk`` blocks, runs the fused
        kernel (one launch of clusters, cuda/akv_fused.cu) instead of the four launches: only
        where it exists (compute capability 9.0) and serves (at most FUSED_MAX_BLOCKS
        blocks); with ``fused`` True only where it was measured faster, at most
        FUSED_MAX_CLUSTERS clusters (B x Hk); "always" wherever it serves; never when False.

        Measured on the H200 at 4k tokens (docs/perf-notes.md, tenth session; CUDA-graph
        medians, fused / four launches): SmolLM2 1 x 4k (3 clusters) 14.1-14.2 / 15.7-15.8 us;
        Llama-3-8B 1 x 4k (8 clusters) 25.4-25.8 / 23.6-24.0; Llama-2-7B 1 x 4k (32) 51.5 /
        30.0; Llama-3-8B 8 x 4k (64) 121 / 58. A cluster's CTAs take 13-17 us from start to
        end at batch 1, and the H200 holds only 7 clusters of 16 CTAs at one CTA per
        multiprocessor, so beyond a few clusters they share multiprocessors or wait."""
        if self.k_fused is None or not self.fused or nblk > FUSED_MAX_BLOCKS:
            return False
        return self.fused == "always" or B * Hk <= FUSED_MAX_CLUSTERS

    def _estimate_launch(self, nblk: int, Hq: int, B: int) -> tuple:
        """(kernel, grid, block) of the estimate phase for sequences of at most ``nblk``
        blocks. Both kernels give the same bits (GPU tests); the choice is speed, measured on
        the H200 at 4k tokens (docs/perf-notes.md, ninth session). The 256-thread kernel
        takes ~6 us up to about 2 CTAs per multiprocessor and grows with its CTA count; the
        one-warp-per-head kernel (akv_decode_estimate_short, up to SHORT_ESTIMATE_BLOCKS
        blocks) has a longer chain per warp but grows little. Query heads x sequences
        (CTAs of the 256-thread kernel), 256-thread / short: 9 and 32 (batch 1): 5.9-6.1 /
        7.0-7.6 us; 256: 6.4-6.6 / 7.4-8.0; 288: 6.8-7.0 / 7.2; 1024: 13.9-14.5 / 8.4-8.6
        (GQA) and 14.7-15.8 / 9.2 (MHA). So the short kernel runs above
        SHORT_ESTIMATE_MIN_CTAS_PER_SM CTAs per multiprocessor."""
        if self.short_estimate == "always" or (
                self.short_estimate and
                Hq * B > SHORT_ESTIMATE_MIN_CTAS_PER_SM * self.dev.multiprocessors):
            if nblk <= SHORT_ESTIMATE_BLOCKS:
                return (self.k_estimate_short, (-(-Hq // SHORT_ESTIMATE_HEADS), B),
                        (32 * SHORT_ESTIMATE_HEADS,))
        return (self.k_estimate, (Hq, B), (ESTIMATE_THREADS,))

    def _plan(self, layer, mode, rule, count, k_map, v_map, fused=False, whole=False):
        """Packed kernel arguments for one kind of decode call (see :meth:`decode_phases`):
        ``whole`` packs the V-whole path (versions >= 3: akv_decode_values_whole_* and the
        rescaling combine; 1 and 2: V at tier 16, the estimate uncounted); ``whole="split"``
        also the arguments of the split kernel (akv_decode_split_whole_v7_*), which the
        flash kernel (akv_decode_flash_whole_v7_*) takes too."""
        key = (layer, mode, rule, bool(count), k_map, v_map,
               "fused" if fused else self.decode_version,
               whole if whole == "split" else bool(whole))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        cache = self.cache
        Hq, Hk, D = cache.num_query_heads, cache.num_kv_heads, cache.head_dim
        G, bps = Hq // Hk, cache.blocks_per_sequence
        plan = _DecodePlan()
        if fused:
            counters = ptr(self.ws["counters"].ptr if count else 0)
            p = {n: ptr(self._plane_ptr(n, layer)) for n in PLANE_NAMES}
            debug = [ptr(self.ws[n].ptr if k_map else 0) for n in ("scores", "stats", "o_est")]
            plan.pack("fused", [
                plan.q_ptr, plan.q_sb, plan.q_sh, ptr(self._lengths_ptr(layer)),
                ptr(self.ws["block_table"].ptr), i32(bps), p["k_hi"], p["k_mid"], p["k_lo"],
                p["k_exp_max"], p["v_hi"], p["v_mid"], p["v_lo"], p["v_exp_max"], i32(Hk),
                f32(1.0 / np.sqrt(D)), i32(1 if mode == "full" else 0),
                i32(rule.k_thresholds[0]), i32(rule.k_thresholds[1]),
                i32(rule.v_thresholds[0]), i32(rule.v_thresholds[1]), i32(rule.v_skip_gap),
                i32(rule.v_bias), i32(rule.topk), plan.bpc, plan.out_ptr, counters,
                ptr(k_map), ptr(v_map), *debug])
            self._plans[key] = plan
            return plan
        score_extra = [plan.score_split] if self.decode_version >= 3 else []
        extra = [plan.split] if self.decode_version >= 3 else []
        counters = ptr(self.ws["counters"].ptr if count else 0)
        full = i32(1 if mode == "full" else 0)
        ws = {n: ptr(a.ptr) for n, a in self.ws.items()}
        lengths = ptr(self._lengths_ptr(layer))
        p = {n: ptr(self._plane_ptr(n, layer)) for n in PLANE_NAMES}
        plan.pack("scores", [
            plan.q_ptr, plan.q_sb, plan.q_sh, lengths, ws["block_table"], i32(bps),
            p["k_hi"], p["k_mid"], p["k_lo"], p["k_exp_max"], i32(Hk), i32(G),
            f32(1.0 / np.sqrt(D)), full, i32(rule.k_thresholds[0]), i32(rule.k_thresholds[1]),
            *score_extra, ws["scores"], ws["block_max"], ws["block_sum"], ws["block_arg"], counters,
            ptr(k_map)])
        split_path = whole and self.decode_version >= 3
        # the V-whole path of versions 1-2 runs the estimate for m and l only: uncounted
        plan.pack("estimate", [
            lengths, ws["block_table"], i32(bps), p["v_hi"], i32(Hk), i32(G), i32(D),
            i32(rule.topk), ws["block_max"], ws["block_sum"], ws["block_arg"], ws["stats"],
            ws["o_est"], ptr(0) if whole else counters])
        # the V-whole path's values kernels (versions >= 3) also take the block statistics
        # and split_stats
        value_extra = ([ws["block_max"], ws["block_sum"], ws["split_stats"]]
                       if split_path else [])
        plan.pack("values", [
            lengths, ws["block_table"], i32(bps), p["v_hi"], p["v_mid"], p["v_lo"],
            p["v_exp_max"], i32(Hk), i32(G), i32(1) if whole else full,
            i32(rule.v_thresholds[0]),
            i32(rule.v_thresholds[1]), i32(rule.v_skip_gap), i32(rule.v_bias), *extra,
            ws["scores"], ws["stats"], ws["o_est"], ws["partial"], counters, ptr(v_map),
            *value_extra])
        plan.pack("combine", [lengths, i32(bps), i32(Hq), i32(D), plan.split, ws["partial"],
                              *([ws["split_stats"]] if split_path else []), plan.out_ptr])
        if whole == "split":
            # the split and flash kernels (akv7::split_whole, akv7::flash_whole): the scores
            # kernel's arguments with the V planes after the K planes, then the values
            # kernel's outputs (the flash kernel leaves the block statistics alone and
            # writes the scores only with the debug maps)
            plan.pack("split_whole", [
                plan.q_ptr, plan.q_sb, plan.q_sh, lengths, ws["block_table"], i32(bps),
                p["k_hi"], p["k_mid"], p["k_lo"], p["k_exp_max"], p["v_hi"], p["v_mid"],
                p["v_lo"], i32(Hk), i32(G), f32(1.0 / np.sqrt(D)), full,
                i32(rule.k_thresholds[0]), i32(rule.k_thresholds[1]), plan.split,
                ws["scores"], ws["block_max"], ws["block_sum"], ws["block_arg"],
                ws["partial"], ws["split_stats"], counters, ptr(k_map), ptr(v_map)])
        self._plans[key] = plan
        return plan

    def _new_output(self, q_info):
        if q_info.is_torch:
            import torch
            out = torch.empty(q_info.shape, dtype=torch.float16, device=q_info.obj.device)
            return out, out.data_ptr()
        buffer, arrays = allocate_arrays(self.dev, {"out": (q_info.shape, np.float16)})
        return arrays["out"], arrays["out"].ptr

    def _debug_maps(self, stream):
        cache = self.cache
        if self._debug is None:
            B, Hk, bps, D = (cache.batch_size, cache.num_kv_heads, cache.blocks_per_sequence,
                             cache.head_dim)
            self._debug_buffer, self._debug = allocate_arrays(self.dev, {
                "k_tiers": ((B, Hk, bps, D), np.uint8),
                "v_tiers": ((B, Hk, bps * BLOCK_TOKENS), np.uint8)})
        for arr in self._debug.values():
            driver.memset8(arr.ptr, 0, arr.nbytes, stream)
        return self._debug["k_tiers"].ptr, self._debug["v_tiers"].ptr

    def _debug_info(self, layer, stream, whole=False):
        driver.synchronize(stream)
        lengths = self.cache._lengths[layer]
        k_map = self._debug["k_tiers"].to_numpy(stream)
        v_map = self._debug["v_tiers"].to_numpy(stream)
        scores = self.ws["scores"].to_numpy(stream)
        info = {"k_tiers": [], "v_tiers": [], "scores": [],
                # the V-whole path runs no estimate: no global statistics, no O_est
                "stats": None if whole else self.ws["stats"].to_numpy(stream),
                "o_est": None if whole else self.ws["o_est"].to_numpy(stream),
                "counters": dict(zip(COUNTER_NAMES, self.read_counters().tolist()))}
        for b, n in enumerate(lengths):
            n = int(n)
            info["k_tiers"].append(k_map[b, :, :blocks_for(n)])
            info["v_tiers"].append(v_map[b, :, :n])
            info["scores"].append(scores[b, :, :n])
        return info

    # ------------------------------------------------------------------ views
    def plane(self, name, layer):
        shape = self.cache.layout.plane_shape(name)[1:]
        base = self.planes[name]
        return DeviceArray(base.owner, base.offset + layer * self.layer_nbytes[name], shape,
                           np.uint8)

    def host_planes(self, layer):
        return {n: self.plane(n, layer).to_numpy() for n in PLANE_NAMES}

    def read_counters(self):
        return self.ws["counters"].to_numpy().astype(np.int64)

    def reset_counters(self):
        driver.memset8(self.ws["counters"].ptr, 0, self.ws["counters"].nbytes)
        driver.synchronize()

    def reset_lengths(self):
        driver.synchronize()
        driver.memset8(self.ws["lengths"].ptr, 0, self.ws["lengths"].nbytes)
        driver.memset8(self.ws["append_arrive"].ptr, 0, self.ws["append_arrive"].nbytes)
        driver.synchronize()

    def close(self):
        for buf in (self._plane_buffer, self._ws_buffer, self._debug_buffer):
            if buf is not None:
                buf.close()


def ctypes_i64(value):
    return ctypes.c_int64(int(value))


class _DecodePlan:
    """Kernel arguments of one kind of decode call, packed once (``void**`` addresses), with
    the per-call values as ctypes objects that :meth:`CudaBackend.decode_phases` rewrites."""

    def __init__(self):
        self.q_ptr, self.out_ptr = ptr(0), ptr(0)
        self.q_sb, self.q_sh = ctypes_i64(0), ctypes_i64(0)
        self.split = i32(1)
        self.score_split = i32(1)
        self.bpc = i32(1)
        self._keep = []

    def pack(self, name, args):
        address, keep = driver.pack_args(args)
        self._keep.append(keep)
        setattr(self, name, address)
