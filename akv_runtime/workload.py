"""The attention-level workload: prefill a context, then decode steps, at any shapes.

When no model can run (no checkpoint for Llama-2-7B, or a machine without the model), the run
still exercises the cache at a model's attention shapes: it prefills ``context_tokens`` tokens
of K/V into every layer, then runs decode steps (append one token, attend one query) and
measures the bits read, the error against float64 and plain fp16 attention, and on a GPU the
time per step. Two sources of q/K/V feed it:

* :class:`SyntheticSource` — **K/V drawn from SmolLM2-measured statistics**, never presented
  as model data: every (layer, KV head, channel) of the target shape takes the per-channel
  mean and standard deviation that SmolLM2-135M's real post-RoPE K, V and q show on real text
  (``akv_runtime/data/smollm2_kv_stats.npz``, written by ``scripts/make_kv_stats.py``), and
  token 0 takes SmolLM2's exact BOS key/value (the attention sink). ``docs/workload.md`` says
  exactly how channels, heads and layers are mapped and how well it matches real K/V.
* :class:`TraceSource` — real q/K/V of a few SmolLM2 layers captured on a CPU machine
  (:mod:`akv_runtime.model`, ``.trace/*.npz``), replayed where the model cannot run.

:class:`DecodeMeter` accumulates the measurements; the Hugging Face integration feeds it too.
Arrays are numpy on the CPU (numpy backend) and torch CUDA tensors on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import reference
from .layout import (BLOCK_TOKENS, COUNTER_NAMES, blocks_for, k_bytes_per_channel_block,
                     v_bytes_per_token)

#: The statistics file shipped with the package.
STATS_PATH = Path(__file__).resolve().parent / "data" / "smollm2_kv_stats.npz"
#: How synthetic K/V are labelled everywhere they are reported.
SYNTHETIC_LABEL = "K/V drawn from SmolLM2-measured statistics"
STATS_FORMAT = 1


# ------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class KVStats:
    """Per-channel statistics of a real model's post-RoPE q, K and V.

    Attributes
    ----------
    k_mean, k_std, v_mean, v_std : float32 [layers, kv_heads, D]
        Mean and standard deviation of each channel over tokens 1..n-1 of real text.
    q_mean, q_std : float32 [layers, query_heads, D]
    k_sink, v_sink : float16 [layers, kv_heads, D]
        Token 0 (BOS) exactly: it is the same vector for every text (the first token sees
        only itself) and takes most of the attention weight in many heads (the sink).
    meta : dict
        ``model``, ``texts``, ``tokens`` per text, ``rope_theta``.
    """

    k_mean: np.ndarray
    k_std: np.ndarray
    v_mean: np.ndarray
    v_std: np.ndarray
    q_mean: np.ndarray
    q_std: np.ndarray
    k_sink: np.ndarray
    v_sink: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.k_mean.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_mean.shape[1]

    @property
    def num_query_heads(self) -> int:
        return self.q_mean.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_mean.shape[2]

    def channel_scale_profile(self, which: str = "k") -> np.ndarray:
        """Rank-ordered channel scales ``sqrt(mean² + std²)`` (RMS), largest first,
        averaged over layers and heads: float [D]. The profile the channel map preserves."""
        mean, std = getattr(self, f"{which}_mean"), getattr(self, f"{which}_std")
        rms = np.sqrt(mean.astype(np.float64) ** 2 + std.astype(np.float64) ** 2)
        return np.sort(rms, axis=-1)[..., ::-1].mean(axis=(0, 1))


def measure_kv_stats(captures: list, meta: dict) -> KVStats:
    """Statistics of captured q/K/V (:func:`akv_runtime.model.capture_kv` outputs).

    Parameters
    ----------
    captures : list of dict layer → (q, k, v)
        One capture per text, all layers, float16 ``[heads, n, D]``; token 0 must be BOS.
    meta : dict
        Stored with the statistics.
    """
    layers = sorted(captures[0])

    def moments(index):
        means, stds = [], []
        for layer in layers:
            x = np.concatenate([c[layer][index][:, 1:].astype(np.float64) for c in captures],
                               axis=1)
            means.append(x.mean(axis=1))
            stds.append(x.std(axis=1))
        return np.asarray(means, np.float32), np.asarray(stds, np.float32)

    q_mean, q_std = moments(0)
    k_mean, k_std = moments(1)
    v_mean, v_std = moments(2)
    k_sink = np.asarray([captures[0][l][1][:, 0] for l in layers], np.float16)
    v_sink = np.asarray([captures[0][l][2][:, 0] for l in layers], np.float16)
    return KVStats(k_mean, k_std, v_mean, v_std, q_mean, q_std, k_sink, v_sink,
                   dict(meta, format=STATS_FORMAT))


def save_kv_stats(path, stats: KVStats) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(stats, name) for name in
              ("k_mean", "k_std", "v_mean", "v_std", "q_mean", "q_std", "k_sink", "v_sink")}
    arrays["meta"] = np.frombuffer(json.dumps(stats.meta).encode(), np.uint8)
    np.savez_compressed(path, **arrays)
    return path


_STATS_CACHE: dict = {}


def load_kv_stats(path=None) -> KVStats:
    """Read the statistics file (default: the one shipped in ``akv_runtime/data``).

    Raises
    ------
    FileNotFoundError
        With the command that regenerates it.
    """
    path = Path(STATS_PATH if path is None else path)
    key = str(path.resolve())
    if key in _STATS_CACHE:
        return _STATS_CACHE[key]
    if not path.is_file():
        raise FileNotFoundError(f"no K/V statistics at {path}; regenerate them with "
                                f"python scripts/make_kv_stats.py")
    with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        stats = KVStats(**{name: data[name] for name in
                           ("k_mean", "k_std", "v_mean", "v_std", "q_mean", "q_std",
                            "k_sink", "v_sink")}, meta=meta)
    _STATS_CACHE[key] = stats
    return stats


# ------------------------------------------------------------------------- mapping


def channel_map(source_dim: int, target_dim: int) -> np.ndarray:
    """Source channel of each target channel, by position in the RoPE spectrum.

    Llama's RoPE (``rotate_half``) pairs channel ``i`` with ``i + D/2`` and gives pair ``i``
    the frequency ``theta^(-2i/D)``: the low-frequency pairs at the top of each half carry
    the large, fixed-sign K outliers. Target channel ``c`` (half ``c // (D'/2)``, pair
    ``j = c % (D'/2)``) takes source channel ``half·D/2 + floor(j·D/D')``: same half, same
    relative frequency. From 64 to 128 channels every source channel appears twice, so the
    rank-ordered profile of channel scales is the source's, stretched.

    Returns
    -------
    int64 [target_dim]
    """
    if source_dim % 2 or target_dim % 2:
        raise ValueError("channel_map: head dims must be even (RoPE pairs)")
    half_s, half_t = source_dim // 2, target_dim // 2
    c = np.arange(target_dim)
    half, pair = c // half_t, c % half_t
    return (half * half_s + (pair * half_s) // half_t).astype(np.int64)


def source_layer(stats: KVStats, layer_fraction: float) -> int:
    """The SmolLM2 layer at the same relative depth (0 = first layer, 1 = last)."""
    if not 0.0 <= layer_fraction <= 1.0:
        raise ValueError(f"layer_fraction: expected 0..1, got {layer_fraction}")
    return int(round(layer_fraction * (stats.num_layers - 1)))


def kv_head_map(stats: KVStats, kv_heads: int) -> np.ndarray:
    """Source KV head of each target KV head: ``h mod Hk_source``."""
    return np.arange(kv_heads) % stats.num_kv_heads


def query_head_map(stats: KVStats, query_heads: int, kv_heads: int) -> np.ndarray:
    """Source query head of each target query head.

    Target query head ``i`` belongs to target KV head ``h = i // G``; it takes a query head of
    the source GQA group of ``kv_head_map(h)``, cycling through that group
    (``(i mod G + h // Hk_source) mod G_source``), so a query always comes from the group
    whose keys it meets.
    """
    if query_heads % kv_heads:
        raise ValueError(f"query_heads {query_heads} is not a multiple of kv_heads {kv_heads}")
    group_t = query_heads // kv_heads
    group_s = stats.num_query_heads // stats.num_kv_heads
    i = np.arange(query_heads)
    h = i // group_t
    src_kv = h % stats.num_kv_heads
    return src_kv * group_s + (i % group_t + h // stats.num_kv_heads) % group_s


def _standard_normal(rng, shape):
    """Standard normals from a numpy Generator (→ float32 numpy) or a torch Generator
    (→ float32 tensor on the generator's device)."""
    if isinstance(rng, np.random.Generator):
        return rng.standard_normal(shape, dtype=np.float32)
    import torch
    return torch.randn(shape, generator=rng, device=rng.device, dtype=torch.float32)


def _as_like(array, like):
    """numpy ``array`` as the same kind as ``like`` (numpy, or a torch tensor's device)."""
    if isinstance(like, np.ndarray):
        return array
    import torch
    return torch.as_tensor(array, device=like.device)


def _to_fp16(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float16)
    import torch
    return x.to(torch.float16)


def synthetic_kv(rng, batch: int, kv_heads: int, tokens: int, head_dim: int,
                 layer_fraction: float, *, start: int = 0, stats: KVStats | None = None):
    """K and V **drawn from SmolLM2-measured statistics** (not model data).

    Each value of target channel ``c`` of KV head ``h`` is drawn from a normal distribution
    with the mean and standard deviation that SmolLM2's post-RoPE K (or V) shows in the
    channel ``channel_map(c)`` of head ``kv_head_map(h)`` at the layer of the same relative
    depth; token position 0 is SmolLM2's BOS key/value of that head (the attention sink).

    Parameters
    ----------
    rng : numpy.random.Generator or torch.Generator
        numpy arrays come back for a numpy generator, torch tensors on the generator's device
        (e.g. CUDA) for a torch one.
    batch, kv_heads, tokens, head_dim : int
    layer_fraction : float
        Relative depth of the layer, 0 (first) .. 1 (last).
    start : int
        Position of the first token drawn (position 0 is the sink token).
    stats : KVStats, optional
        Default: :func:`load_kv_stats`.

    Returns
    -------
    (k, v) : float16 [batch, kv_heads, tokens, head_dim]
    """
    stats = load_kv_stats() if stats is None else stats
    layer = source_layer(stats, layer_fraction)
    heads = kv_head_map(stats, kv_heads)[:, None]
    chans = channel_map(stats.head_dim, head_dim)[None, :]
    out = []
    for name in ("k", "v"):
        mean = getattr(stats, f"{name}_mean")[layer][heads, chans]        # [Hk, D]
        std = getattr(stats, f"{name}_std")[layer][heads, chans]
        z = _standard_normal(rng, (batch, kv_heads, tokens, head_dim))
        x = z * _as_like(std[None, :, None, :], z) + _as_like(mean[None, :, None, :], z)
        if start == 0:
            sink = getattr(stats, f"{name}_sink")[layer][heads, chans].astype(np.float32)
            x[:, :, 0, :] = _as_like(np.broadcast_to(sink, (batch, kv_heads, head_dim)).copy(),
                                     z)
        out.append(_to_fp16(x))
    return out[0], out[1]


def synthetic_q(rng, batch: int, query_heads: int, head_dim: int, layer_fraction: float, *,
                num_kv_heads: int, stats: KVStats | None = None):
    """Decode queries drawn from SmolLM2-measured statistics (see :func:`synthetic_kv`).

    Returns
    -------
    float16 [batch, query_heads, head_dim] (numpy, or torch on the generator's device)
    """
    stats = load_kv_stats() if stats is None else stats
    layer = source_layer(stats, layer_fraction)
    heads = query_head_map(stats, query_heads, num_kv_heads)[:, None]
    chans = channel_map(stats.head_dim, head_dim)[None, :]
    mean = stats.q_mean[layer][heads, chans]
    std = stats.q_std[layer][heads, chans]
    z = _standard_normal(rng, (batch, query_heads, head_dim))
    return _to_fp16(z * _as_like(std[None], z) + _as_like(mean[None], z))


# ------------------------------------------------------------------------- sources


def spread_layers(num_layers: int, count: int | None) -> list:
    """``count`` layer indices spread evenly over ``num_layers`` (first and last included)."""
    if count is None or count >= num_layers:
        return list(range(num_layers))
    if count == 1:
        return [num_layers - 1]
    return sorted({int(round(i * (num_layers - 1) / (count - 1))) for i in range(count)})


class SyntheticSource:
    """q/K/V drawn from SmolLM2-measured statistics at a model's shapes.

    Parameters
    ----------
    num_layers, num_query_heads, num_kv_heads, head_dim : int
        The model's shapes (``num_layers`` sets each layer's relative depth).
    layers : list of int
        Model layers simulated (cache layer ``i`` holds model layer ``layers[i]``).
    batch : int
    seed : int
    device : str
        ``"cpu"`` (numpy arrays) or a torch CUDA device (tensors drawn there).
    """

    label = SYNTHETIC_LABEL

    def __init__(self, num_layers, num_query_heads, num_kv_heads, head_dim, layers, batch,
                 seed=0, device="cpu", stats=None):
        self.stats = load_kv_stats() if stats is None else stats
        self.num_model_layers = num_layers
        self.layers = list(layers)
        self.num_query_heads, self.num_kv_heads, self.head_dim = (num_query_heads,
                                                                  num_kv_heads, head_dim)
        self.batch = batch
        self.device = device
        if device == "cpu":
            self._rngs = [np.random.default_rng([seed, layer]) for layer in self.layers]
        else:
            import torch
            self._rngs = []
            for layer in self.layers:
                g = torch.Generator(device=device)
                g.manual_seed(seed * 1_000_003 + layer)
                self._rngs.append(g)

    def _fraction(self, i):
        return self.layers[i] / max(self.num_model_layers - 1, 1)

    def prefill(self, i, tokens):
        """K, V ``[batch, kv_heads, tokens, D]`` of positions ``0..tokens-1`` of cache layer i."""
        return synthetic_kv(self._rngs[i], self.batch, self.num_kv_heads, tokens,
                            self.head_dim, self._fraction(i), stats=self.stats)

    def step(self, i, position):
        """``(q [B, Hq, D], k [B, Hk, 1, D], v)`` of one decode step at ``position``."""
        k, v = synthetic_kv(self._rngs[i], self.batch, self.num_kv_heads, 1, self.head_dim,
                            self._fraction(i), start=position, stats=self.stats)
        q = synthetic_q(self._rngs[i], self.batch, self.num_query_heads, self.head_dim,
                        self._fraction(i), num_kv_heads=self.num_kv_heads, stats=self.stats)
        return q, k, v


class TraceSource:
    """Real q/K/V of a trace (:class:`akv_runtime.model.Trace`), batch 1."""

    label = "real q/K/V replayed from a trace"

    def __init__(self, trace, device="cpu"):
        self.trace = trace
        meta = trace.meta
        self.num_model_layers = int(meta["num_layers"])
        self.layers = trace.layers
        self.num_query_heads = int(meta["num_query_heads"])
        self.num_kv_heads = int(meta["num_kv_heads"])
        self.head_dim = int(meta["head_dim"])
        self.batch = 1
        self.device = device
        self.label = f"real q/K/V of {meta.get('model', 'a model')} on {meta.get('text', '?')} " \
                     f"replayed from a trace"

    def _dev(self, x):
        x = np.ascontiguousarray(x)
        if self.device == "cpu":
            return x
        import torch
        return torch.from_numpy(x).to(self.device)

    def prefill(self, i, tokens):
        layer = self.layers[i]
        return (self._dev(self.trace.k[layer][None, :, :tokens]),
                self._dev(self.trace.v[layer][None, :, :tokens]))

    def step(self, i, position):
        layer = self.layers[i]
        j = position - self.trace.context_tokens
        return (self._dev(self.trace.q[layer][None, :, j]),
                self._dev(self.trace.k[layer][None, :, position:position + 1]),
                self._dev(self.trace.v[layer][None, :, position:position + 1]))


# ------------------------------------------------------------------------- measuring


def to_host(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().to("cpu").numpy()


def full_read_bytes(lengths, kv_heads: int, head_dim: int) -> np.ndarray:
    """Bytes a decode step reads at 16 bits (no precision alignment) per counter, with the
    same block accounting as the kernel: K whole 64-token blocks, V token rows.

    Returns int64 [len(COUNTER_NAMES)] (the ``values`` counter included, metadata 0).
    """
    c = np.zeros(len(COUNTER_NAMES), np.int64)
    for n in np.asarray(lengths).ravel():
        n = int(n)
        nblk = blocks_for(n)
        k_bytes = int(k_bytes_per_channel_block(16)) * nblk * kv_heads * head_dim
        v_bytes = int(v_bytes_per_token(16, head_dim)) * n * kv_heads
        # hi, mid, lo shares of a full read: 8, 4, 4 bits
        c[0] += k_bytes // 2
        c[1] += k_bytes // 4
        c[2] += k_bytes // 4
        c[3] += v_bytes // 2
        c[4] += v_bytes // 4
        c[5] += v_bytes // 4
        c[7] += n * head_dim * kv_heads
    return c


def attention_errors(cache, layer: int, q, out, out_full=None) -> dict:
    """Relative errors per (sequence, query head) of decode-attention outputs against the
    float64 attention of the same q and the cache's K/V (read back at 16 bits).

    Returns
    -------
    dict with float64 arrays [batch * query_heads]: ``aligned`` (``out``), ``fp16``
    (:func:`reference.fp16_attention`, plain fp16 attention as eager torch does it) and
    ``full`` (``out_full``, the cache's 16-bit mode) when given.
    """
    q = to_host(q)
    out = to_host(out)
    out_full = None if out_full is None else to_host(out_full)
    errors = {"aligned": [], "fp16": [], "full": []}
    for b in range(q.shape[0]):
        K, V = cache.read(layer, b, 16)
        ref = reference.float64_attention(q[b], K, V)
        f16 = reference.fp16_attention(q[b], K, V)
        for h in range(q.shape[1]):
            errors["aligned"].append(reference.relative_error(out[b, h], ref[h]))
            errors["fp16"].append(reference.relative_error(f16[h], ref[h]))
            if out_full is not None:
                errors["full"].append(reference.relative_error(out_full[b, h], ref[h]))
    return {k: np.asarray(v) for k, v in errors.items() if v}


class DecodeMeter:
    """Accumulates what decode steps read and how far their outputs are from float64.

    Parameters
    ----------
    num_layers : int
        Cache layers.
    error_steps : set of int
        Decode-step indices (per layer, counted from 0) at which :meth:`observe` also
        measures attention errors.
    full_mode_errors : bool
        At those steps also run the cache's ``full`` mode and measure its error.
    """

    def __init__(self, num_layers: int, error_steps=(), full_mode_errors: bool = True):
        self.layer_bytes = np.zeros((num_layers, len(COUNTER_NAMES)), np.int64)
        self.full_bytes = np.zeros((num_layers, len(COUNTER_NAMES)), np.int64)
        self.steps = np.zeros(num_layers, np.int64)
        self.error_steps = set(int(s) for s in error_steps)
        self.full_mode_errors = full_mode_errors
        self.errors: dict = {}
        self.last_query: dict = {}

    def observe(self, cache, layer: int, q, out, *, counted: bool = True) -> None:
        """Record one decode attention of ``layer`` that just ran with ``count=True`` after
        ``cache.reset_counters()`` (so the cache's counters hold this call's bytes)."""
        if counted:
            c = cache.counters()
            self.layer_bytes[layer] += np.array([c[n] for n in COUNTER_NAMES], np.int64)
        self.full_bytes[layer] += full_read_bytes(cache.lengths(layer), cache.num_kv_heads,
                                                  cache.head_dim)
        step = int(self.steps[layer])
        self.steps[layer] += 1
        self.last_query[layer] = q
        if step in self.error_steps:
            out_full = (cache.attend(layer, q, mode="full") if self.full_mode_errors
                        else None)
            for name, values in attention_errors(cache, layer, q, out, out_full).items():
                self.errors.setdefault(name, []).append(values)

    # -------------------------------------------------------------- summaries
    def bits_per_value(self) -> dict:
        """{k, v, total} over all layers and steps (total includes metadata)."""
        return reference.bits_per_value(self.layer_bytes.sum(axis=0))

    def full_read_bits(self) -> dict:
        """{k, v, total}: what reading all 16 bits costs with the same block accounting."""
        return reference.bits_per_value(self.full_bytes.sum(axis=0))

    def layer_bits(self) -> dict:
        """{k, v, total, k_full_read}: lists per cache layer (``k_full_read``: K bits of a
        16-bit read of the same blocks)."""
        per = [reference.bits_per_value(row) for row in self.layer_bytes]
        out = {key: [p[key] for p in per] for key in ("k", "v", "total")}
        out["k_full_read"] = [reference.bits_per_value(row)["k"] for row in self.full_bytes]
        return out

    def error_summary(self) -> dict:
        """Median and 99th percentile per kind, over (step, layer, sequence, query head)."""
        out = {}
        for name, chunks in self.errors.items():
            values = np.concatenate(chunks)
            out[name] = float(np.median(values))
            out[f"{name}_p99"] = float(np.percentile(values, 99))
        out["samples"] = int(sum(len(c) for c in self.errors.get("aligned", [])))
        return out


def error_step_indices(steps: int, count: int) -> list:
    """``count`` decode-step indices spread evenly over ``steps`` (the last included)."""
    if count <= 0 or steps <= 0:
        return []
    count = min(count, steps)
    return sorted({int(round((i + 1) * steps / count)) - 1 for i in range(count)})


# ------------------------------------------------------------------------- timing


def time_decode_attention(cache, queries: dict, repeats: int = 50) -> dict:
    """Decode attention time per step on a GPU, with CUDA events: the aligned cache
    (``cache.attend``, counters off) against plain fp16 attention (torch SDPA on fp16 K/V of
    the same content, GQA through ``enable_gqa``), summed over the layers in ``queries``.

    Parameters
    ----------
    cache : AlignedKVCache on the cuda backend
    queries : dict cache layer → float16 CUDA tensor [batch, query_heads, D]
    repeats : int

    Returns
    -------
    dict ``aligned_step``, ``fp16_step`` (ms per decode step over those layers), and
    ``aligned_layer``/``fp16_layer`` lists (ms per layer).
    """
    import torch
    import torch.nn.functional as F
    device = next(iter(queries.values())).device
    aligned, fp16 = [], []
    stream = torch.cuda.current_stream(device)
    for layer, q in queries.items():
        q = q.contiguous()
        out = torch.empty_like(q)
        ks, vs = zip(*(cache.read(layer, b, 16) for b in range(cache.batch_size)))
        K = torch.from_numpy(np.stack(ks)).to(device)
        V = torch.from_numpy(np.stack(vs)).to(device)
        q4 = q[:, :, None, :]
        gqa = cache.num_query_heads != cache.num_kv_heads

        def run_aligned():
            cache.attend(layer, q, out=out)

        def run_fp16():
            F.scaled_dot_product_attention(q4, K, V, enable_gqa=gqa)

        for fn, sink in ((run_aligned, aligned), (run_fp16, fp16)):
            for _ in range(3):
                fn()
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(repeats):
                fn()
            stop.record(stream)
            stop.synchronize()
            sink.append(start.elapsed_time(stop) / repeats)
        del K, V
    return {"aligned_step": float(sum(aligned)), "fp16_step": float(sum(fp16)),
            "aligned_layer": aligned, "fp16_layer": fp16}


# ------------------------------------------------------------------------- the workload


@dataclass
class WorkloadResult:
    """What :func:`run_attention_workload` measured."""

    meter: DecodeMeter
    layers: list
    lengths: list
    timing: dict | None = None


def run_attention_workload(source, cache, *, context_tokens: int, decode_steps: int,
                           error_steps: int = 8, timing_repeats: int = 50,
                           progress: bool = True) -> WorkloadResult:
    """Prefill ``context_tokens`` into every cache layer, then run ``decode_steps`` decode
    steps (each appends one token and attends one query per sequence in every layer).

    Parameters
    ----------
    source : SyntheticSource or TraceSource
        Gives K/V and queries; cache layer ``i`` holds ``source.layers[i]``.
    cache : AlignedKVCache
        Empty, with ``len(source.layers)`` layers and room for the tokens.
    error_steps : int
        Decode steps (evenly spaced) at which errors are measured in every layer.
    timing_repeats : int
        On the cuda backend, the timing repetitions per layer (after the decode steps).

    Returns
    -------
    WorkloadResult
    """
    from tqdm.auto import tqdm
    num = len(source.layers)
    meter = DecodeMeter(num, error_step_indices(decode_steps, error_steps))
    for i in tqdm(range(num), desc="prefill", unit="layer", disable=None if progress else True,
                  leave=False):
        k, v = source.prefill(i, context_tokens)
        cache.append(i, k, v)
    for s in tqdm(range(decode_steps), desc="decode", unit="step", disable=None if progress else True,
                  leave=False):
        position = context_tokens + s
        for i in range(num):
            q, k, v = source.step(i, position)
            cache.append(i, k, v)
            cache.reset_counters()
            out = cache.attend(i, q, count=True)
            meter.observe(cache, i, q, out)
    timing = None
    if cache.backend == "cuda":
        timing = time_decode_attention(cache, dict(meter.last_query), timing_repeats)
    return WorkloadResult(meter, list(source.layers), cache.lengths().tolist(), timing)


__all__ = ["DecodeMeter", "KVStats", "STATS_PATH", "SYNTHETIC_LABEL", "SyntheticSource",
           "TraceSource", "WorkloadResult", "attention_errors", "channel_map",
           "error_step_indices", "full_read_bytes", "kv_head_map", "load_kv_stats",
           "measure_kv_stats", "query_head_map", "run_attention_workload", "save_kv_stats",
           "source_layer", "spread_layers", "synthetic_kv", "synthetic_q",
           "time_decode_attention"]
