"""AlignedKVCache: per-layer bit planes, block table, append and precision-aligned decode.

The cache is the public face of the runtime. It checks every argument in Python before any
launch (a bad call raises ``ValueError``/``TypeError`` naming the argument and leaves the
cache unchanged), then hands the work to a backend:

* ``cuda`` – the cubins of ``cuda/akv.cu`` through the cuda-python driver API
  (:mod:`akv_runtime.kernels`), buffers owned by the runtime and exported through DLPack;
* ``numpy`` – :mod:`akv_runtime.reference`, the kernels' numpy twin, used when no driver or
  no GPU is present (with a notice), so the same calls work on a CPU machine.

Layout and rules: DESIGN.md sections 3–5; :mod:`akv_runtime.layout`.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import reference
from .arrays import describe, is_torch_tensor, to_numpy
from .layout import (BLOCK_TOKENS, COUNTER_NAMES, MAX_GQA_GROUP, PLANE_NAMES,
                     SUPPORTED_HEAD_DIMS, PlaneLayout, blocks_for, identity_block_table)
from .reference import (SEED_RULE, AlignmentRule, check_mode, check_v_rule, named_rule,
                        v_rule_applies)


class CPUFallbackWarning(RuntimeWarning):
    """The CUDA backend is unavailable; the numpy reference serves the cache."""


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_bool(name, value) -> bool:
    """``value`` as a bool; ``TypeError`` naming ``name`` for anything but bool/numpy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _host_memory_error(layout: PlaneLayout, block_table: bool = False) -> MemoryError:
    """A MemoryError that says what the cache needed (the numpy backend's planes, or a block
    table that large) and which arguments set it (``block_table``: the planes were sized
    by a given block table's largest entry, or by num_blocks)."""
    if block_table:
        return MemoryError(
            f"block_table: the planes of {layout.num_layers} layers x {layout.num_blocks} "
            f"blocks (the table's largest entry + 1, or num_blocks) need "
            f"{layout.total_nbytes / 2**30:.1f} GiB of host memory, more than this machine "
            f"gives; use smaller physical block numbers, or lower num_layers")
    return MemoryError(
        f"max_seq_len: the planes of {layout.num_layers} layers x {layout.num_blocks} blocks "
        f"need {layout.total_nbytes / 2**30:.1f} GiB of host memory, more than this machine "
        f"gives; lower max_seq_len, batch_size or num_layers")


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can."""
    from . import driver
    return driver.unavailable_reason()


def _check_rule_backend(rule: AlignmentRule, backend: str) -> None:
    """NotImplementedError for a rule the backend cannot run: the two-pass K read
    (``rule.k_weight_margin``) exists in the numpy reference only (a design study)."""
    if backend == "cuda" and rule.k_weight_margin is not None:
        raise NotImplementedError(
            "rule.k_weight_margin: the two-pass K read is a design study of the numpy "
            "reference (docs/fidelity.md); the CUDA kernels do not implement it; use "
            "backend='numpy' or a rule without k_weight_margin")


def _as_rule(rule) -> AlignmentRule:
    """An AlignmentRule, or the name of one of ``reference.RULES`` ("seed", "tuned",
    "precise"); TypeError / ValueError otherwise."""
    if isinstance(rule, str):
        return named_rule(rule)                 # a ValueError naming the rules if unknown
    if not isinstance(rule, AlignmentRule):
        raise TypeError(f"rule: expected an AlignmentRule or a rule name, got "
                        f"{type(rule).__name__}")
    return rule


class AlignedKVCache:
    """A bit-plane KV cache for decode with precision-aligned reads.

    Parameters
    ----------
    num_layers : int
        Decoder layers L.
    num_kv_heads : int
        KV heads per layer.
    head_dim : int
        Channels per head D: 64 or 128.
    max_seq_len : int
        Tokens each sequence can hold (rounded up to whole 64-token blocks).
    num_query_heads : int, optional
        Query heads (default ``num_kv_heads``: MHA); a multiple of ``num_kv_heads`` with a
        GQA group of at most 8.
    batch_size : int
        Sequences in the batch.
    block_table : int array [batch_size, blocks_per_sequence], optional
        Physical block of each logical block of each sequence (paged attention). Default: a
        contiguous cache (the identity table). Copied and checked once; the cache's copy
        (``cache.block_table``) is read-only.
    num_blocks : int, optional
        Blocks in the pool (default ``batch_size * blocks_per_sequence``).
    rule : AlignmentRule or str
        The precision-alignment rule used in ``aligned`` mode (DESIGN.md section 4), or the
        name of one of ``reference.RULES``.
    v_rule : {"auto", "always", "never"}
        When an ``aligned`` call applies the rule's V side (docs/design.md, "The V-whole
        path"; settable later as ``cache.v_rule``). ``auto`` (default): on calls whose V,
        read whole, exceeds ``reference.V_RULE_MIN_BYTES`` (128 MiB); smaller calls read V at
        all 16 bits (K still at its tiers) and skip the V rule's estimate phase, which there
        costs more time than the V bytes it saves. ``always``: the paper's rule on every
        call. ``never``: V always whole. The counters report what was read either way.
    backend : {"auto", "cuda", "numpy"}
        ``auto`` takes CUDA when a driver and a GPU are present, else numpy with a
        :class:`CPUFallbackWarning`.
    device_id : int
        CUDA device ordinal.

    Raises
    ------
    ValueError
        For impossible shapes (head counts that do not divide, unsupported head_dim, a block
        table out of range) or ``backend="cuda"`` on a machine without one.
    MemoryError
        The numpy backend's planes (or a block table) do not fit in host memory; the message
        gives the size and the arguments that set it. On CUDA, a failed device allocation
        raises ``driver.CudaError`` (CUDA_ERROR_OUT_OF_MEMORY).
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, max_seq_len, *,
                 num_query_heads=None, batch_size=1, block_table=None, num_blocks=None,
                 rule: AlignmentRule = SEED_RULE, v_rule: str = "auto", backend="auto",
                 device_id=0):
        num_layers = _positive_int("num_layers", num_layers)
        num_kv_heads = _positive_int("num_kv_heads", num_kv_heads)
        max_seq_len = _positive_int("max_seq_len", max_seq_len)
        batch_size = _positive_int("batch_size", batch_size)
        if (isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer))
                or head_dim not in SUPPORTED_HEAD_DIMS):
            raise ValueError(f"head_dim: expected one of {SUPPORTED_HEAD_DIMS}, got {head_dim!r}")
        head_dim = int(head_dim)
        num_query_heads = num_kv_heads if num_query_heads is None else _positive_int(
            "num_query_heads", num_query_heads)
        if num_query_heads % num_kv_heads:
            raise ValueError(f"num_query_heads: {num_query_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if num_query_heads // num_kv_heads > MAX_GQA_GROUP:
            raise ValueError(f"num_query_heads: a GQA group of "
                             f"{num_query_heads // num_kv_heads} exceeds {MAX_GQA_GROUP}")
        rule = _as_rule(rule)
        check_v_rule(v_rule)
        blocks_per_seq = blocks_for(max_seq_len)
        if block_table is None:
            num_blocks = batch_size * blocks_per_seq if num_blocks is None else num_blocks
            num_blocks = _positive_int("num_blocks", num_blocks)
            if num_blocks < batch_size * blocks_per_seq:
                raise ValueError(f"num_blocks: {num_blocks} blocks cannot hold the identity "
                                 f"table of {batch_size} x {blocks_per_seq} blocks; pass "
                                 f"block_table")
            try:
                table = identity_block_table(batch_size, blocks_per_seq)
            except MemoryError:
                raise _host_memory_error(PlaneLayout(num_layers, num_blocks, num_kv_heads,
                                                     head_dim)) from None
        else:
            try:
                table = np.asarray(to_numpy(block_table))
            except (TypeError, ValueError, RuntimeError, BufferError) as exc:
                raise TypeError(f"block_table: expected a host integer array [batch, blocks], "
                                f"got {type(block_table).__name__} ({exc})") from None
            if table.ndim != 2 or table.shape[0] != batch_size or table.shape[1] < blocks_per_seq:
                raise ValueError(f"block_table: expected shape [{batch_size}, >= "
                                 f"{blocks_per_seq}], got {list(table.shape)}")
            if table.dtype.kind not in "iu":       # not bool, not timedelta64 either
                raise TypeError(f"block_table: expected integers, got {table.dtype}")
            table = table[:, :blocks_per_seq]
            # the range is checked on the caller's integers, before the int32 copy (which
            # would wrap entries of 2^31 and above)
            lo, hi = int(table.min()), int(table.max())
            num_blocks = hi + 1 if num_blocks is None else _positive_int("num_blocks",
                                                                         num_blocks)
            limit = min(num_blocks, 2**31 - 1)
            if lo < 0:
                raise ValueError(f"block_table: entries must be >= 0 (physical block "
                                 f"numbers), got {lo}")
            if hi >= limit:
                raise ValueError(f"block_table: entries must lie in [0, {limit})")
            # a copy: the cache checks the table once, so a later change to the caller's
            # array must not reach it (np.ascontiguousarray would keep an int32 array as is)
            table = np.array(table, dtype=np.int32, order="C", copy=True)
            if len(np.unique(table)) != table.size:
                raise ValueError("block_table: a physical block appears twice; each logical "
                                 "block needs its own physical block")
        if backend not in ("auto", "cuda", "numpy"):
            raise ValueError(f"backend: expected 'auto', 'cuda' or 'numpy', got {backend!r}")

        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_query_heads, self.batch_size = num_query_heads, batch_size
        self.blocks_per_sequence = blocks_per_seq
        self.capacity = blocks_per_seq * BLOCK_TOKENS
        self.rule = rule
        self._v_rule = v_rule
        self.layout = PlaneLayout(num_layers, int(num_blocks), num_kv_heads, head_dim)
        table.flags.writeable = False        # checked once: read-only from here on
        self._block_table = table
        self._lengths = np.zeros((num_layers, batch_size), np.int64)
        self._closed = False

        if backend == "auto":
            reason = cuda_unavailable_reason()
            if reason is None:
                backend = "cuda"
            else:
                warnings.warn(f"akv_runtime: no CUDA backend ({reason}); the numpy reference "
                              f"serves the cache on the CPU", CPUFallbackWarning, stacklevel=2)
                backend = "numpy"
        _check_rule_backend(rule, backend)          # before any device memory is taken
        if backend == "cuda":
            reason = cuda_unavailable_reason()
            if reason is not None:
                raise ValueError(f"backend: 'cuda' is not available here: {reason}")
            from .kernels import CudaBackend
            self._backend = CudaBackend(self, device_id)
        else:
            try:
                self._backend = NumpyBackend(self)
            except MemoryError:
                raise _host_memory_error(self.layout, block_table is not None) from None

    # ----------------------------------------------------------------- properties
    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"numpy"``."""
        return self._backend.name

    @property
    def v_rule(self) -> str:
        """When aligned calls apply the V rule: ``"auto"``, ``"always"`` or ``"never"`` (see
        the class docstring). Setting it checks the value (ValueError otherwise)."""
        return self._v_rule

    @v_rule.setter
    def v_rule(self, value: str) -> None:
        check_v_rule(value)
        self._v_rule = value

    def v_rule_applies(self, layer: int) -> bool:
        """Whether an ``aligned`` call on ``layer`` now applies the V rule (else it reads V
        whole): ``reference.v_rule_applies`` for this cache's shape and the layer's longest
        sequence."""
        return self._applies_v_rule(self._check_layer(layer))

    def _applies_v_rule(self, layer: int) -> bool:
        return v_rule_applies(self._v_rule, self.batch_size, self.num_kv_heads,
                              self.head_dim, int(self._lengths[layer].max()))

    @property
    def device(self) -> str:
        """The device in words (GPU name and compute capability, or the CPU)."""
        return self._backend.device_name

    def lengths(self, layer: int | None = None) -> np.ndarray:
        """Tokens held per sequence: int64 ``[batch]`` for ``layer``, or ``[L, batch]``."""
        if layer is None:
            return self._lengths.copy()
        return self._lengths[self._check_layer(layer, need_open=False)].copy()

    # ----------------------------------------------------------------- checks
    @property
    def block_table(self) -> np.ndarray:
        """int32 [batch_size, blocks_per_sequence], read-only: the physical block of each
        logical block of each sequence, as checked and copied at creation (it cannot be
        replaced; the GPU holds the same copy)."""
        return self._block_table

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the cache is closed: its device buffers were freed (close() or "
                             "the end of a with-block); make a new cache")

    def _check_layer(self, layer, need_open: bool = True):
        if need_open:
            self._check_open()
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: {layer} is out of range [0, {self.num_layers})")
        return int(layer)

    def _check_array(self, name, x, shape):
        info = describe(x, name)
        if info.dtype != np.float16:
            raise TypeError(f"{name}: expected dtype float16, got {info.dtype_name}")
        if len(info.shape) != len(shape) or any(
                want is not None and got != want for got, want in zip(info.shape, shape)):
            want = ", ".join("*" if w is None else str(w) for w in shape)
            raise ValueError(f"{name}: expected shape [{want}], got {list(info.shape)}")
        self._backend.check_device(name, info)
        return info

    # ----------------------------------------------------------------- append
    def append(self, layer: int, k, v, *, counts=None, stream=None) -> None:
        """Append new tokens' K and V to the sequences of ``layer`` (prefill or decode).

        Parameters
        ----------
        layer : int
        k, v : float16 [batch, kv_heads, new_tokens, head_dim]
            The projected (RoPE-applied) keys and values, as Hugging Face lays them out; any
            strides with the channel axis contiguous are read in place on the GPU.
        counts : int array [batch], optional
            Tokens to append to each sequence, each in 0 .. new_tokens: sequence b takes rows
            0 .. counts[b] - 1 of its ``new_tokens`` and ignores the rest (a right-padded
            ragged prefill; 0 leaves the sequence as it is), so the sequences of a batch can
            hold different lengths. Default: every sequence takes all ``new_tokens`` (one
            launch). With counts that differ, the GPU appends one sequence per launch.
        stream : int, optional
            CUDA stream handle to launch on (default: torch's current stream for torch
            tensors, else the legacy default stream).

        Raises
        ------
        TypeError, ValueError
            Wrong dtype, shape, device, layer or counts, no token to append, or more tokens
            than the capacity; the cache is unchanged.
        """
        layer = self._check_layer(layer)
        B, Hk, D = self.batch_size, self.num_kv_heads, self.head_dim
        k_info = self._check_array("k", k, (B, Hk, None, D))
        v_info = self._check_array("v", v, (B, Hk, None, D))
        if k_info.shape != v_info.shape:
            raise ValueError(f"v: shape {list(v_info.shape)} differs from k's "
                             f"{list(k_info.shape)}")
        new = k_info.shape[2]
        if new < 1:
            raise ValueError("k: holds no tokens (new_tokens == 0)")
        per = self._check_counts(counts, new)
        after = self._lengths[layer] + per
        if after.max() > self.capacity:
            b = int(after.argmax())
            raise ValueError(f"k: appending {int(per[b])} token{'s' if per[b] != 1 else ''} "
                             f"to sequence {b} of layer {layer} would hold "
                             f"{int(after[b])} tokens, past the capacity of "
                             f"{self.capacity} (max_seq_len rounded up to 64-token blocks)")
        ragged = None if (per == new).all() else per
        self._backend.append(layer, k_info, v_info, self._lengths[layer].copy(), stream,
                             ragged)
        self._lengths[layer] = after

    def _check_counts(self, counts, new: int) -> np.ndarray:
        """``append``'s counts as int64 [batch] (all ``new`` when None), or the error."""
        B = self.batch_size
        if counts is None:
            return np.full(B, new, np.int64)
        if isinstance(counts, (str, bytes)):
            raise TypeError(f"counts: expected a host integer array [{B}], got "
                            f"{type(counts).__name__}")
        if isinstance(counts, np.ma.MaskedArray):
            raise TypeError("counts: expected a plain integer array, got a masked array (a "
                            "masked sequence would still be appended; give it a count of 0)")
        try:
            arr = np.asarray(to_numpy(counts))
        except (TypeError, ValueError, RuntimeError, BufferError) as exc:
            raise TypeError(f"counts: expected a host integer array [{B}], got "
                            f"{type(counts).__name__} ({exc})") from None
        if arr.shape != (B,):
            raise ValueError(f"counts: expected shape [{B}] (one per sequence), got "
                             f"{list(arr.shape)}")
        if arr.dtype.kind not in "iu":          # not bool, float, timedelta64, object...
            raise TypeError(f"counts: expected integers, got {arr.dtype}")
        if arr.min() < 0 or arr.max() > new:
            raise ValueError(f"counts: each must lie in [0, {new}] (new_tokens), got "
                             f"{arr.min()} .. {arr.max()}")
        if arr.max() == 0:
            raise ValueError("counts: appends no token (every count is 0)")
        return arr.astype(np.int64)

    # ----------------------------------------------------------------- attend
    def attend(self, layer: int, q, *, mode: str = "aligned", out=None, stream=None,
               count: bool = False, debug: bool = False, rule: AlignmentRule | None = None,
               strict: bool = False):
        """Decode attention of one query token per sequence over ``layer``'s cache.

        ``o = softmax(q·Kᵀ/√D)·V`` with K read per (block, channel) and V per token at the
        tiers the precision-alignment rule picks (``mode="aligned"``, DESIGN.md section 4), or
        at all 16 bits (``mode="full"``, equal to fp16 attention up to fp32 rounding).
        ``strict=True`` asks for the 16-bit read on this call only, so requests that need
        exact fp16 attention can be served from the same cache as aligned ones.

        Parameters
        ----------
        layer : int
        q : float16 [batch, query_heads, head_dim]
        mode : {"aligned", "full"}
        out : float16 [batch, query_heads, head_dim], optional
            Written in place (contiguous); with it the call allocates nothing on the GPU.
        stream : int, optional
            CUDA stream handle (default: torch's current stream for torch tensors).
        count : bool
            Add the bytes read per plane to the cache's counters (:meth:`counters`).
        debug : bool
            Also return a dict with the tiers, scores, weights and estimates the backend used
            (copies to the host; for tests). ``stats`` and ``o_est`` are None where V is read
            whole (full mode, or a call the V rule leaves out: no estimate phase ran).
        rule : AlignmentRule or str, optional
            Override the cache's rule for this call (a name picks ``reference.RULES[name]``).
        strict : bool
            Read all 16 bits for this call, whatever ``mode`` says: the result (and the bytes
            counted) is exactly that of ``mode="full"``. Default ``False``: ``mode`` decides.

        Returns
        -------
        output : same kind as ``q`` (numpy array or torch tensor) [batch, query_heads, D]
            fp16; ``(output, debug_info)`` when ``debug``.

        Raises
        ------
        TypeError, ValueError
            Bad dtype/shape/device/layer/mode/strict/count/debug, or a sequence that holds
            no tokens.
        """
        layer = self._check_layer(layer)
        check_mode(mode)
        strict = check_bool("strict", strict)
        count = check_bool("count", count)
        debug = check_bool("debug", debug)
        if strict:
            mode = "full"
        rule = self.rule if rule is None else _as_rule(rule)
        if mode == "aligned":
            _check_rule_backend(rule, self.backend)
        shape = (self.batch_size, self.num_query_heads, self.head_dim)
        q_info = self._check_array("q", q, shape)
        out_info = None
        if out is not None:
            out_info = self._check_array("out", out, shape)
            if tuple(out_info.strides) != (shape[1] * shape[2], shape[2], 1):
                raise ValueError("out: expected a contiguous array")
            if out_info.device == "cpu" and not to_numpy(out).flags.writeable:
                raise ValueError("out: expected a writable array (it is read-only)")
        if self._lengths[layer].min() < 1:
            empty = int(np.argmin(self._lengths[layer]))
            raise ValueError(f"layer: sequence {empty} of layer {layer} holds no tokens; "
                             f"append before attend")
        v_whole = mode == "aligned" and not self._applies_v_rule(layer)
        return self._backend.attend(layer, q_info, out_info, mode, rule, stream, count, debug,
                                    v_whole)

    # ----------------------------------------------------------------- reading
    def read(self, layer: int, sequence: int, tier: int = 16) -> tuple:
        """Read one sequence back at ``tier`` bits (8, 12 or 16) to the host.

        Returns
        -------
        (K, V) : float16 numpy [kv_heads, length, head_dim]; at tier 16 bit-identical to what
        was appended. At tier 8 or 12 the bits not read take their range's midpoint (mid
        nibble 0x8 and lo nibble 0, or lo nibble 0x8), as the kernels assemble them
        (docs/design.md); Inf stays Inf.
        """
        layer = self._check_layer(layer)
        if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)):
            raise TypeError(f"sequence: expected an int, got {type(sequence).__name__}")
        if not 0 <= sequence < self.batch_size:
            raise ValueError(f"sequence: {sequence} is out of range [0, {self.batch_size})")
        if isinstance(tier, bool) or not isinstance(tier, (int, np.integer)) or tier not in (
                8, 12, 16):
            raise ValueError(f"tier: expected 8, 12 or 16, got {tier!r}")
        planes = self._backend.host_planes(layer)
        return reference.read_sequence(planes, self.block_table[sequence],
                                       int(self._lengths[layer, sequence]), tier)

    def plane(self, name: str, layer: int):
        """Plane ``name`` of ``layer`` (uint8, shape of :meth:`PlaneLayout.plane_shape` without
        the layer axis), zero-copy: a DLPack-exporting device array on CUDA
        (``torch.from_dlpack(cache.plane("k_hi", 0))`` views the same memory), a numpy view on
        the CPU."""
        if name not in PLANE_NAMES:
            raise ValueError(f"name: expected one of {PLANE_NAMES}, got {name!r}")
        return self._backend.plane(name, self._check_layer(layer))

    def k_hi(self, layer):
        return self.plane("k_hi", layer)

    def k_mid(self, layer):
        return self.plane("k_mid", layer)

    def k_lo(self, layer):
        return self.plane("k_lo", layer)

    def v_hi(self, layer):
        return self.plane("v_hi", layer)

    def v_mid(self, layer):
        return self.plane("v_mid", layer)

    def v_lo(self, layer):
        return self.plane("v_lo", layer)

    # ----------------------------------------------------------------- counters
    def counters(self) -> dict:
        """Bytes read per plane since the last :meth:`reset_counters`, counted by the kernel
        (``count=True`` calls only), plus ``bits_per_value`` {k, v, total}."""
        self._check_open()
        raw = self._backend.read_counters()
        out = {n: int(c) for n, c in zip(COUNTER_NAMES, raw)}
        out["bits_per_value"] = reference.bits_per_value(raw)
        return out

    def reset_counters(self) -> None:
        self._check_open()
        self._backend.reset_counters()

    def reset(self) -> None:
        """Forget every token (lengths to zero); the planes are overwritten by later appends."""
        self._check_open()
        self._backend.reset_lengths()
        self._lengths[:] = 0

    def close(self) -> None:
        """Free the device buffers now (also done when the cache is collected); a buffer that
        a DLPack consumer still views is freed when the last such view is collected. After
        this every method but ``close``, ``lengths`` and the properties raises ValueError
        (the kernels would otherwise run on freed memory). Idempotent."""
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"AlignedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"query_heads={self.num_query_heads}, head_dim={self.head_dim}, "
                f"batch={self.batch_size}, capacity={self.capacity}, v_rule={self._v_rule!r}, "
                f"backend={self.backend!r})")


class NumpyBackend:
    """The CPU backend: planes in numpy arrays, kernels from :mod:`akv_runtime.reference`."""

    name = "numpy"
    device_name = "CPU (numpy reference)"

    def __init__(self, cache: AlignedKVCache):
        self.cache = cache
        self.planes = {n: np.zeros(cache.layout.plane_shape(n), np.uint8) for n in PLANE_NAMES}
        self._counters = np.zeros(len(COUNTER_NAMES), np.int64)

    def check_device(self, name, info):
        if info.device != "cpu":
            raise ValueError(f"{name}: the numpy backend takes host arrays, got a "
                             f"{info.device} array")

    def layer_planes(self, layer):
        return {n: a[layer] for n, a in self.planes.items()}

    host_planes = layer_planes

    def append(self, layer, k_info, v_info, starts, stream, counts=None):
        reference.append_tokens(self.layer_planes(layer), self.cache.block_table, starts,
                                to_numpy(k_info.obj), to_numpy(v_info.obj), counts)

    def attend(self, layer, q_info, out_info, mode, rule, stream, count, debug,
               v_whole=False):
        cache = self.cache
        result = reference.decode_attention(
            self.layer_planes(layer), to_numpy(q_info.obj), cache.block_table,
            cache._lengths[layer], mode, rule, keep_debug=debug, v_whole=v_whole)
        if out_info is not None:                # written first: a failed write counts nothing
            to_numpy(out_info.obj)[...] = result.output
            output = out_info.obj
        elif q_info.is_torch:
            import torch
            output = torch.from_numpy(result.output)
        else:
            output = result.output
        if count:
            self._counters += result.counters
        if not debug:
            return output
        whole = v_whole or mode == "full"      # no estimate phase: no global stats, no O_est
        info = {"k_tiers": result.k_tiers, "v_tiers": result.v_tiers,
                "scores": result.scores, "weights": result.weights,
                "stats": None if whole else result.stats,
                "o_est": None if whole else result.o_est,
                "counters": result.counter_dict()}
        return output, info

    def plane(self, name, layer):
        return self.planes[name][layer]

    def read_counters(self):
        return self._counters.copy()

    def reset_counters(self):
        self._counters[:] = 0

    def reset_lengths(self):
        pass

    def close(self):
        pass


__all__ = ["AlignedKVCache", "CPUFallbackWarning", "AlignmentRule", "SEED_RULE",
           "cuda_unavailable_reason", "is_torch_tensor"]
