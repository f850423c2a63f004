"""Fidelity evaluation (GitHub issue 5), first version: CPU, numpy reference, real SmolLM2 q/K/V.

``python -m akv_runtime.eval [--json PATH] [--quick] [--trace PATH]``

What it measures, on the real post-RoPE q/K/V of SmolLM2-135M-Instruct over real English
text (``model.capture_kv`` on GPL-3 by default, or a trace written by ``run --save-trace``).
Each kept layer is replayed as the attention-level workload does it: the first
``context_tokens`` tokens are appended to an :class:`~akv_runtime.cache.AlignedKVCache`
(numpy backend), then at each decode position the position's K/V are appended and the
position's query attends (``cache.attend(..., count=True, debug=True)``, that is
:func:`akv_runtime.reference.decode_attention` under the seed rule).

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
   [1/256, 1/128), >= 1/128.
2. **Attention-output relative error** ``‖o − o64‖/‖o64‖`` against
   :func:`reference.float64_attention` per (position, layer, query head), for the aligned
   output of ``decode_attention`` and for :func:`reference.fp16_attention`; median and p99.
3. **Bits read per value** (K, V, total with metadata) from ``decode_attention``'s byte
   counters (:func:`reference.bits_per_value`), summed over all decode calls. K is read in
   whole 64-token blocks, so a partly filled last block makes K cost more than 16 bits per
   value (docs/workload.md section 4).

Not measured by this version: perplexity, token agreement and the peers (trunc8, fp8);
their JSON keys are ``null``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import reference as ref
from .reference import fp16_scores, fp16_weighted_sum, fp16_weights  # plain fp16 arithmetic
from .layout import BLOCK_TOKENS

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
NOT_MEASURED = ("perplexity, token agreement and the peers (trunc8, fp8) are not measured by "
                "this version")

DEFAULT = {"layers": 7, "context_tokens": 1024, "decode_steps": 64}
QUICK = {"layers": 2, "context_tokens": 256, "decode_steps": 8}


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
    """
    n = K.shape[1]
    kt = np.repeat(np.asarray(k_tiers), BLOCK_TOKENS, axis=1)[:, :n]        # [Hk, n, D]
    K_al = ref.join_planes(*ref.split_planes(np.asarray(K, np.float16)), kt)
    vt = np.asarray(v_tiers)[:, :n, None]                                   # [Hk, n, 1]
    V_al = ref.join_planes(*ref.split_planes(np.asarray(V, np.float16)), vt)
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
             progress: bool = True) -> dict:
    """Run the fidelity evaluation over a trace; returns the JSON-ready result.

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
    cache = AlignedKVCache(len(kept), Hk, D, C_first + steps, num_query_heads=Hq,
                           backend="numpy")
    counts = {s: {r: np.zeros(6, np.int64) for r in ROWS} for s in SIDES}
    errs = {"aligned": [], "fp16": []}
    t0 = time.perf_counter()
    bar = tqdm(total=len(kept) * steps, desc="fidelity (layer, position)", unit="pos",
               disable=not progress)
    for i, layer in enumerate(kept):
        k_all, v_all, q_all = trace.k[layer], trace.v[layer], trace.q[layer]
        cache.append(i, k_all[None, :, :C_first], v_all[None, :, :C_first])
        for step in range(steps):
            pos = C_first + step
            n = pos + 1
            cache.append(i, k_all[None, :, pos:n], v_all[None, :, pos:n])
            q = np.ascontiguousarray(q_all[:, pos - trace.context_tokens])   # [Hq, D]
            out, dbg = cache.attend(i, q[None], count=True, debug=True)
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
    bar.close()
    elapsed = time.perf_counter() - t0
    counters = cache.counters()
    from .layout import COUNTER_NAMES
    bits = ref.bits_per_value([counters[n] for n in COUNTER_NAMES])
    att = {}
    for name, e in errs.items():
        e = np.concatenate(e)
        att[name] = {"median": float(np.median(e)), "p99": float(np.percentile(e, 99))}
    buckets = {s: {r: (c / c.sum()).tolist() for r, c in counts[s].items()} for s in SIDES}
    return {
        "kv_source": f"real q/K/V of {meta.get('model', '?')} on {meta.get('text', '?')} "
                     f"(post-RoPE, fp16)",
        "machine": "CPU, numpy reference",
        "rule": ref.SEED_RULE.name,
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
        "token_agreement": None,
        "perplexity": None,
        "not_measured": NOT_MEASURED,
        "paper_reference": PAPER_ALIGNED,
        "elapsed_s": round(elapsed, 1),
    }


# ----------------------------------------------------------------------------- report


def _pct(x) -> str:
    return f"{100 * x:.2f}%"


def format_report(result: dict) -> str:
    """The readable tables: buckets per side with the paper's reference row, attention error,
    bits per value."""
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
    lines.append(f"not measured: {result['not_measured']} (JSON: null)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m akv_runtime.eval", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")
    p.add_argument("--quick", action="store_true",
                   help=f"small run: {QUICK['layers']} layers, {QUICK['context_tokens']} + "
                        f"{QUICK['decode_steps']} tokens (default {DEFAULT['layers']} layers, "
                        f"{DEFAULT['context_tokens']} + {DEFAULT['decode_steps']})")
    p.add_argument("--trace", metavar="PATH",
                   help="replay a trace (run --save-trace) instead of running the model")
    p.add_argument("--text", default="GPL-3", help="corpus text for the capture (GPL-3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> dict:
    settings = QUICK if args.quick else DEFAULT
    if args.trace:
        from .model import load_trace
        from .workload import spread_layers
        trace = load_trace(args.trace)
        keep = trace.layers
        if len(keep) > settings["layers"]:
            keep = [keep[j] for j in spread_layers(len(keep), settings["layers"])]
        return evaluate(trace, decode_steps=min(settings["decode_steps"], trace.decode_steps),
                        layers=keep, progress=not args.no_progress)
    print(f"capturing real q/K/V: SmolLM2-135M-Instruct, {settings['layers']} layers, "
          f"{settings['context_tokens']} + {settings['decode_steps']} tokens of {args.text} ...",
          flush=True)
    trace = capture_trace(settings["context_tokens"], settings["decode_steps"],
                          settings["layers"], args.text)
    return evaluate(trace, progress=not args.no_progress)


def main(argv=None) -> int:
    from .model import ModelUnavailableError, set_offline
    set_offline()
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ModelUnavailableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
