#!/usr/bin/env python3
"""Design study (CPU): the two-pass K read (``AlignmentRule.k_weight_margin``) on real K/V.

    python scripts/study_two_pass_k.py [--context 2048] [--steps 64] [--layers 7]
                                       [--json study.json]

Captures real SmolLM2-135M-Instruct q/K/V on the GPL-3 text (the evaluation's default
attention replay, ``python -m akv_runtime.eval``), then replays it through the numpy
reference for the named rules and for two-pass variants, and prints error against float64
(× plain fp16's) and bits per value. Bits count pass 2's re-read of the hi rows it refines;
"bits, hi kept" is the same read with the hi rows kept on chip between the passes (a fused
kernel). The two-pass rules have no CUDA kernels yet (docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from akv_runtime import eval as ev                      # noqa: E402
from akv_runtime import reference as R                  # noqa: E402

def _two_pass(k, margin, z=None, v_skip=None):
    bound = "sound" if z is None else f"z{z}"
    skip = f" skip{v_skip}" if v_skip else ""
    return R.AlignmentRule(name=f"2pass {bound} K{k} m{margin}{skip}", k_thresholds=k,
                           v_skip=v_skip, k_weight_margin=margin, k_weight_z=z)


STUDY_RULES = [
    R.SEED_RULE, R.TUNED_RULE, R.PRECISE_RULE,
    _two_pass((11, 7), 4),
    _two_pass((11, 7), 2, z=2),
    _two_pass((10, 6), 2, z=2, v_skip=14),
    _two_pass((9, 5), 2, z=2, v_skip=14),
    _two_pass((10, 6), 2, z=4, v_skip=14),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.time()
    trace = ev.capture_trace(args.context, args.steps, args.layers)
    print(f"captured {args.context}+{args.steps} tokens, layers {trace.layers} "
          f"({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for rule in STUDY_RULES:
        t1 = time.time()
        r = ev.evaluate(trace, rule=rule, progress=False)
        c = r["bits_per_value"]
        kept = dict(r["counters"])
        if rule.k_weight_margin is not None:   # pass 2 without re-reading the hi rows
            kept["k_hi_bytes"] -= 2 * kept["k_mid_bytes"]
        c_kept = R.bits_per_value([kept[name] for name in R.COUNTER_NAMES])
        err, fp16 = r["attention_rel_error"]["aligned"], r["attention_rel_error"]["fp16"]
        row = {"rule": rule.name, "fields": r["rule_fields"],
               "k_weight_margin": rule.k_weight_margin,
               "median": err["median"], "p99": err["p99"], "fp16_median": fp16["median"],
               "fp16_p99": fp16["p99"], "bits": c, "bits_hi_kept": c_kept,
               "counters": r["counters"], "buckets": r["buckets"],
               "elapsed_s": round(time.time() - t1, 1)}
        rows.append(row)
        print(f"  {rule.name}: median {err['median']:.3e} "
              f"({err['median'] / fp16['median']:.2f}x fp16), bits {c['total']:.2f} "
              f"({row['elapsed_s']} s)", flush=True)
    print(f"\n{'rule':<34}{'median':>10}{'x fp16':>8}{'p99 x':>7}{'K bits':>8}{'V bits':>8}"
          f"{'bits':>7}{'K kept':>8}{'kept':>7}")
    for row in rows:
        b = row["bits"]
        print(f"{row['rule']:<34}{row['median']:>10.3e}{row['median'] / row['fp16_median']:>8.2f}"
              f"{row['p99'] / row['fp16_p99']:>7.2f}{b['k']:>8.2f}{b['v']:>8.2f}"
              f"{b['total']:>7.2f}{row['bits_hi_kept']['k']:>8.2f}"
              f"{row['bits_hi_kept']['total']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"context": args.context, "steps": args.steps,
                                               "layers": trace.layers, "rows": rows},
                                              indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
