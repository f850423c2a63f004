"""The main job: ``python -m akv_runtime.run --config configs/<name>.yaml [--json P] [--plot P]``.

Runs a configuration (:mod:`akv_runtime.config`) through the aligned KV cache and prints a
table that sets it against a plain fp16 cache:

* a real model (``configs/smollm2-135m.yaml``, or an ``hf-checkpoint`` whose directory
  exists): greedy generation of each prompt with the aligned cache and with transformers'
  stock fp16 ``DynamicCache`` (texts side by side, token agreement), teacher-forced
  perplexity on real text through both caches (prefill, then one decode step per token),
  bits read per value, the attention output's relative error against float64 (and plain
  fp16 attention's), and on a GPU the decode attention time per step;
* otherwise (``configs/llama7b.yaml`` without a checkpoint) the attention-level workload at
  the model's shapes with **K/V drawn from SmolLM2-measured statistics**
  (:mod:`akv_runtime.workload`, ``docs/workload.md``);
* ``--trace PATH``: real q/K/V captured from the model on a CPU machine
  (``--save-trace PATH`` there) replayed through the cache, for a machine that cannot load the
  model (the GPU machine has no ``gguf`` package).

Without a GPU the numpy reference serves the cache and the ``cpu`` section of the config
reduces the workload; the run says so in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np

from .arrays import json_default
from .config import Config, ConfigError, RuleConfig, load_config
from .layout import BLOCK_TOKENS
from .model import ModelUnavailableError, TraceFormatError, set_offline
from .reference import RULES

#: Layers a saved trace keeps (spread over the model's depth) and its default shape.
TRACE_LAYERS = 7
TRACE_CONTEXT = 1024
TRACE_STEPS = 64


# ----------------------------------------------------------------------------- helpers


def resolve_backend(requested: str) -> tuple[str, str | None]:
    """``(backend, why_not_cuda)`` for ``--backend auto|cuda|numpy``."""
    from .cache import cuda_unavailable_reason
    if requested == "numpy":
        return "numpy", "--backend numpy"
    reason = cuda_unavailable_reason()
    if requested == "cuda" and reason is not None:
        raise SystemExit(f"error: --backend cuda: no CUDA backend here: {reason}")
    if reason is None:
        try:
            import torch
            if not torch.cuda.is_available():
                reason = "torch sees no CUDA device"
        except ImportError:
            reason = "torch is not installed"
        if reason is not None and requested == "cuda":
            raise SystemExit(f"error: --backend cuda: {reason}")
    return ("cuda", None) if reason is None else ("numpy", reason)


def _progress_enabled(args) -> bool:
    return not args.no_progress


def _fmt(x, spec=".4g", none="—"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _bits(b) -> str:
    return f"{b['k']:.2f} / {b['v']:.2f} / {b['total']:.2f}"


def _v_whole_note(cache) -> str:
    """A clause for the bits note when the cache's last calls read V whole (``v_rule``
    "auto" below the V rule's threshold, or "never"; docs/design.md)."""
    from .reference import V_RULE_MIN_BYTES
    if cache.v_rule_applies(0):
        return ""
    why = ("v_rule 'never'" if cache.v_rule == "never" else
           f"v_rule 'auto': at most {V_RULE_MIN_BYTES >> 20} MiB of V per call, where the "
           f"V rule's estimate phase costs more than it saves")
    return f"; V read whole, K at the rule's tiers ({why}; docs/design.md)"


def _new_cache(config: Config, backend: str, num_layers: int, max_seq_len: int,
               batch_size: int = 1, v_rule: str = "auto"):
    from .cache import AlignedKVCache
    m = config.model
    return AlignedKVCache(num_layers, m.num_kv_heads, m.head_dim, max_seq_len,
                          num_query_heads=m.num_query_heads, batch_size=batch_size,
                          rule=config.rule_object(), v_rule=v_rule, backend=backend)


def _meter_fields(meter, layers) -> dict:
    return {"bits_per_value": meter.bits_per_value(),
            "bits_per_value_full_read": meter.full_read_bits(),
            "bits_per_value_layers": {"layers": list(layers), **meter.layer_bits()},
            "attention_rel_error": meter.error_summary() or None}


# ----------------------------------------------------------------------------- real model


def _check_model_shapes(config: Config, model) -> None:
    from .model import model_shapes
    shapes = model_shapes(model)
    for key, value in shapes.items():
        want = getattr(config.model, key)
        if want != value:
            raise ConfigError(config.source, f"model.{key}",
                              f"{want} in the config, but the model has {value}")


def _agreement(a, b) -> tuple[int, int]:
    """Positions where two greedy continuations hold the same token, and the positions
    compared (the longer of the two; a missing token disagrees)."""
    n = max(len(a), len(b))
    same = sum(1 for x, y in zip(a, b) if x == y)
    return same, n


def run_model(config: Config, backend: str, args, model_path: Path) -> dict:
    """Generation, perplexity, errors and bits of a real model (see the module docstring)."""
    import torch
    from transformers import DynamicCache
    from tqdm.auto import tqdm

    from .integrations import hf
    from .model import corpus_tokens, load_model, prompt_ids
    from .workload import DecodeMeter, error_step_indices, time_decode_attention

    progress = _progress_enabled(args)
    device = "cuda" if backend == "cuda" else "cpu"
    w = config.workload
    t0 = time.perf_counter()
    print(f"loading {config.model.name} from {model_path} (local files only) ...", flush=True)
    model, tokenizer = load_model(model_path, device=device)
    _check_model_shapes(config, model)
    load_s = time.perf_counter() - t0
    hf.use_aligned_attention(model)
    num_layers = config.model.num_layers

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ---------------------------------------------------------------- generation
    generations, same_total, compared_total = [], 0, 0
    gen_meter = DecodeMeter(num_layers)
    bar = tqdm(total=2 * len(w.prompts), desc="generate", unit="run", disable=None if progress else True)
    for prompt in w.prompts:
        ids = prompt_ids(tokenizer, prompt, w.chat_template).to(device)
        base = hf.generate(model, ids, DynamicCache(), w.max_new_tokens)[0].tolist()
        bar.update()
        store = _new_cache(config, backend, num_layers, ids.shape[1] + w.max_new_tokens,
                           v_rule=args.v_rule)
        cache = hf.AlignedCache(store, count=True, observer=gen_meter.observe)
        aligned = hf.generate(model, ids, cache, w.max_new_tokens)[0].tolist()
        bar.update()
        store.close()
        same, n = _agreement(base, aligned)
        same_total, compared_total = same_total + same, compared_total + n
        generations.append({"prompt": prompt, "prompt_tokens": int(ids.shape[1]),
                            "fp16": decode(base), "aligned": decode(aligned),
                            "fp16_tokens": len(base), "aligned_tokens": len(aligned),
                            "identical_tokens": same, "compared_tokens": n})
    bar.close()

    # ---------------------------------------------------------------- perplexity
    ctx, steps = w.context_tokens, w.decode_steps
    tokens = torch.as_tensor(corpus_tokens(tokenizer, w.text, ctx + steps + 1)).to(device)
    tokens = tokens[None]
    meter = DecodeMeter(num_layers, error_step_indices(steps, w.error_steps))
    nll = {}
    store = None
    for name in ("fp16", "aligned"):
        if name == "fp16":
            cache = DynamicCache()
        else:
            store = _new_cache(config, backend, num_layers, ctx + steps, v_rule=args.v_rule)
            cache = hf.AlignedCache(store, count=True, observer=meter.observe)
        total = 0.0
        with torch.inference_mode():
            hf.forward(model, tokens[:, :ctx], cache)  # prefill
            for t in tqdm(range(steps), desc=f"perplexity ({name} cache)", unit="token",
                          disable=None if progress else True):
                logits = hf.forward(model, tokens[:, ctx + t:ctx + t + 1], cache)
                logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
                total -= float(logp[tokens[0, ctx + t + 1]])
        nll[name] = total / steps

    timing = None
    if backend == "cuda":
        timing = time_decode_attention(store, dict(meter.last_query), w.timing_repeats)

    if args.save_trace:
        _save_trace(config, model, tokenizer, args.save_trace)

    result = {
        "device": store.device,
        "workload": "real model: greedy generation + teacher-forced perplexity",
        "model_path": str(model_path),
        "token_agreement": same_total / max(compared_total, 1),
        "token_agreement_counts": [same_total, compared_total],
        "perplexity": {"fp16": math.exp(nll["fp16"]), "aligned": math.exp(nll["aligned"])},
        "perplexity_text": {"text": w.text, "context_tokens": ctx, "scored_tokens": steps},
        "generations": generations,
        "bits_per_value_generation": gen_meter.bits_per_value(),
        "timing_ms": None if timing is None else {
            "aligned_step": timing["aligned_step"], "fp16_step": timing["fp16_step"],
            "layers_timed": len(timing["aligned_layer"])},
        "model_load_s": load_s,
        "bits_note": (f"bits over the {steps} perplexity decode steps at context {ctx + 1}.."
                      f"{ctx + steps}; K is read in whole {BLOCK_TOKENS}-token blocks"
                      + ("" if store is None else _v_whole_note(store))),
    }
    result.update(_meter_fields(meter, range(num_layers)))
    if store is not None:
        store.close()
    return result


def _save_trace(config, model, tokenizer, path):
    """Capture real q/K/V of a few layers on the config's text and write a trace."""
    from .model import capture_kv, corpus_tokens, make_trace, save_trace
    from .workload import spread_layers
    layers = spread_layers(config.model.num_layers, TRACE_LAYERS)
    ids = corpus_tokens(tokenizer, config.workload.text, TRACE_CONTEXT + TRACE_STEPS)
    print(f"capturing a trace: layers {layers}, {TRACE_CONTEXT} + {TRACE_STEPS} tokens of "
          f"{config.workload.text} ...", flush=True)
    captures = capture_kv(model, ids, layers)
    trace = make_trace(captures, TRACE_CONTEXT, {
        "model": config.model.name, "text": config.workload.text,
        "num_layers": config.model.num_layers})
    saved = save_trace(path, trace)
    print(f"wrote {saved} ({saved.stat().st_size / 2**20:.1f} MiB)")


# ----------------------------------------------------------------------------- attention


def run_attention(config: Config, backend: str, args, source_kind: str) -> dict:
    """The attention-level workload: synthetic (SmolLM2 statistics) or a replayed trace."""
    from .workload import SyntheticSource, TraceSource, run_attention_workload, spread_layers
    from .model import load_trace
    device = "cuda" if backend == "cuda" else "cpu"
    w, m = config.workload, config.model
    if source_kind == "trace":
        trace = load_trace(args.trace)
        meta = trace.meta
        for key in ("num_query_heads", "num_kv_heads", "head_dim"):
            if int(meta[key]) != getattr(m, key):
                raise ConfigError(config.source, f"model.{key}",
                                  f"{getattr(m, key)} in the config, but the trace {args.trace}"
                                  f" has {meta[key]}")
        source = TraceSource(trace, device)
        context, steps, batch = trace.context_tokens, trace.decode_steps, 1
    else:
        layers = spread_layers(m.num_layers, config.cpu.num_layers if backend == "numpy"
                               else None)
        source = SyntheticSource(m.num_layers, m.num_query_heads, m.num_kv_heads, m.head_dim,
                                 layers, w.batch, seed=w.seed, device=device)
        context, steps, batch = w.context_tokens, w.decode_steps, w.batch
    cache = _new_cache(config, backend, len(source.layers), context + steps, batch,
                       v_rule=args.v_rule)
    result = run_attention_workload(source, cache, context_tokens=context, decode_steps=steps,
                                    error_steps=w.error_steps,
                                    timing_repeats=w.timing_repeats,
                                    progress=_progress_enabled(args))
    out = {
        "device": cache.device,
        "workload": f"attention level: {source.label}",
        "kv_source": source.label,
        "layers": list(source.layers),
        "shape": {"batch": batch, "context_tokens": context, "decode_steps": steps},
        "token_agreement": None,
        "perplexity": None,
        "timing_ms": None if result.timing is None else {
            "aligned_step": result.timing["aligned_step"],
            "fp16_step": result.timing["fp16_step"],
            "layers_timed": len(result.timing["aligned_layer"])},
        "bits_note": (f"bits over {steps} decode steps at context {context + 1}..."
                      f"{context + steps}, {len(source.layers)} of {m.num_layers} layers; "
                      f"K is read in whole {BLOCK_TOKENS}-token blocks" + _v_whole_note(cache)),
    }
    out.update(_meter_fields(result.meter, source.layers))
    cache.close()
    return out


# ----------------------------------------------------------------------------- report


def _side_by_side(left: str, right: str, width: int) -> list:
    a = textwrap.wrap(left.replace("\n", " ⏎ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ⏎ "), width) or [""]
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return [f"  {x:<{width}} │ {y}" for x, y in zip(a, b)]


def format_report(result: dict) -> str:
    """The table printed at the end of a run."""
    lines = []
    rule = "═" * 96
    lines.append(rule)
    lines.append(f"{result['model']} · {result['workload']}")
    lines.append(f"backend {result['backend']} · {result['device']} · rule "
                 f"{result['rule']['name']} (K {tuple(result['rule']['k_thresholds'])}, "
                 f"V {tuple(result['rule']['v_thresholds'])}, top-k {result['rule']['topk']}"
                 + (f", V skip at gap {result['rule']['v_skip']}"
                    if result['rule'].get('v_skip') is not None else "") + ")")
    if result.get("reduced"):
        lines.append("reduced CPU workload: " + ", ".join(result["reduced"]))
    lines.append(rule)
    width = 46
    for g in result.get("generations", []):
        lines.append(f"prompt: {g['prompt']}")
        lines.append(f"  {'fp16 cache':<{width}} │ aligned cache   "
                     f"({g['identical_tokens']}/{g['compared_tokens']} tokens identical)")
        lines.extend(_side_by_side(g["fp16"], g["aligned"], width))
        lines.append("─" * 96)
    col = 26
    lines.append(f"{'':<40}{'fp16 cache':>{col}}{'aligned cache':>{col}}")

    def row(label, a, b):
        lines.append(f"{label:<40}{a:>{col}}{b:>{col}}")

    agreement = result.get("token_agreement")
    if agreement is not None:
        same, n = result["token_agreement_counts"]
        row("greedy token agreement", "(reference)", f"{100 * agreement:.1f} % ({same}/{n})")
    ppl = result.get("perplexity")
    if ppl is not None:
        pt = result["perplexity_text"]
        row(f"perplexity ({pt['text']}, {pt['scored_tokens']} tokens)",
            f"{ppl['fp16']:.4f}", f"{ppl['aligned']:.4f}")
    bits = result["bits_per_value"]
    full = result["bits_per_value_full_read"]
    row("bits read per value K / V / total", "16.00 / 16.00 / 16.00", _bits(bits))
    row("  16-bit read of the same 64-token blocks", "", _bits(full))
    err = result.get("attention_rel_error") or {}
    if err:
        row("attention rel. error vs float64, median", _fmt(err.get("fp16"), ".2e"),
            _fmt(err.get("aligned"), ".2e"))
        row("  99th percentile", _fmt(err.get("fp16_p99"), ".2e"),
            _fmt(err.get("aligned_p99"), ".2e"))
        if "full" in err:
            row("  (cache's 16-bit 'full' mode, median)", "", _fmt(err.get("full"), ".2e"))
    timing = result.get("timing_ms")
    if timing:
        row(f"decode attention ms/step ({timing['layers_timed']} layers)",
            f"{timing['fp16_step']:.4f}", f"{timing['aligned_step']:.4f}")
    else:
        row("decode attention time per step", "— (GPU only)", "— (GPU only)")
    lines.append(rule)
    lines.append(f"note: {result['bits_note']}; errors are per (step, layer, sequence, query "
                 f"head), {err.get('samples', 0)} samples")
    if "bits_per_value_generation" in result:
        lines.append(f"      generation decode steps (short contexts, partly filled blocks): "
                     f"K/V/total {_bits(result['bits_per_value_generation'])}")
    lines.append(f"elapsed {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def write_plot(result: dict, path) -> Path:
    """PNG: bits read per value per layer, K and V (and the total)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    per = result["bits_per_value_layers"]
    layers = per["layers"]
    x = np.arange(len(layers))
    width = max(8.0, 0.3 * len(layers) + 2)
    fig, ax = plt.subplots(figsize=(width, 4.6))
    ax.bar(x - 0.2, per["k"], 0.4, label="K")
    ax.bar(x + 0.2, per["v"], 0.4, label="V")
    ax.plot(x, per["total"], "k.-", lw=1, label="total (incl. metadata)")
    if "k_full_read" in per:
        ax.plot(x - 0.2, per["k_full_read"], "_", color="C0", ms=10, mew=2,
                label="K, 16-bit read of the same blocks")
    ax.axhline(16, color="grey", ls="--", lw=0.8)
    ax.set_xticks(x, [str(l) for l in layers], fontsize=7 if len(layers) > 16 else 9)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits read per value")
    source = result.get("kv_source") or (
        f"real model, {result['perplexity_text']['text']} decode steps"
        if result.get("perplexity_text") else "")
    title = (f"{result['model']} — {source}. Backend {result['backend']}, rule "
             f"{result['rule']['name']}, {result['bits_note'].split(';')[0]}")
    ax.set_title("\n".join(textwrap.wrap(title, int(width * 12))), fontsize=9)
    ax.set_ylim(0, max(22.0, max(per["k"] + per["v"]) + 5))
    ax.legend(fontsize=8, loc="upper center", ncol=2 if width < 10 else 4, frameon=False)
    fig.tight_layout()
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":   # matplotlib would add ".png" itself; say so truly
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m akv_runtime.run",
        description="Run a model (or its attention shapes) through the aligned KV cache "
                    "and compare with a plain fp16 cache.")
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--plot", help="write a PNG of bits read per layer here")
    parser.add_argument("--backend", choices=("auto", "cuda", "numpy"), default="auto")
    parser.add_argument("--trace", help="replay real q/K/V from this trace (.npz) instead of "
                                        "running the model")
    parser.add_argument("--save-trace", dest="save_trace",
                        help="after a real-model run, capture a trace of a few layers here "
                             "(e.g. .trace/smollm2_trace.npz)")
    parser.add_argument("--rule", choices=sorted(RULES),
                        help="a named precision-alignment rule instead of the config's rule")
    parser.add_argument("--v-rule", dest="v_rule", choices=("auto", "always", "never"),
                        default="auto",
                        help="when the rule's V side runs (AlignedKVCache v_rule; default auto: "
                             "calls of at most 128 MiB of V read V whole; always: the paper's "
                             "rule on every call; docs/design.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(config: Config, args) -> dict:
    """Run a validated config; returns the result dict (the JSON)."""
    started = time.perf_counter()
    backend, why = resolve_backend(args.backend)
    m = config.model
    model_path, notice = None, None
    if args.trace:
        kind = "trace"
    elif m.kind == "none":
        kind = "synthetic"
    else:
        from .model import resolve_model_path
        try:
            model_path = resolve_model_path(m.kind, m.path)
            kind = "model"
        except ModelUnavailableError as exc:
            if m.kind == "gguf-smollm2":
                where = f"{config.source}: model.path: " if m.path else ""
                raise ModelUnavailableError(
                    f"{where}{exc}. Where the model cannot run, replay real q/K/V captured "
                    f"on a machine that has it (--save-trace there): --trace "
                    f".trace/smollm2_trace.npz") from exc
            notice = (f"{exc}: running the attention-level workload at {m.name} shapes "
                      f"({m.num_layers} layers, {m.num_query_heads} query / {m.num_kv_heads} "
                      f"KV heads, head_dim {m.head_dim}) with K/V drawn from SmolLM2-measured "
                      f"statistics")
            kind = "synthetic"
    reduced = []
    if backend == "numpy":
        if kind != "trace":  # a trace replays as captured
            config, reduced = config.reduced_for_cpu(runs_model=(kind == "model"))
        what = ", ".join(reduced) if reduced else "nothing to reduce"
        print(f"no GPU ({why}): running on the numpy reference (CPU) with the reduced "
              f"workload: {what}", flush=True)
    if notice:
        print(notice, flush=True)
    if args.save_trace and kind != "model":
        raise SystemExit("error: --save-trace needs a real-model run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "model":
            result = run_model(config, backend, args, model_path)
        else:
            result = run_attention(config, backend, args, kind)
    rule = config.rule
    head = {"backend": backend, "device": result.pop("device"), "model": m.name,
            "config": config.source,
            "rule": {"name": rule.name, "k_thresholds": list(rule.k_thresholds),
                     "v_thresholds": list(rule.v_thresholds), "topk": rule.topk,
                     "v_bias": rule.v_bias, "v_skip": rule.v_skip},
            "v_rule": args.v_rule,
            "shapes": {"num_layers": m.num_layers, "num_query_heads": m.num_query_heads,
                       "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim},
            "reduced": reduced}
    result = {**head, **result, "elapsed_s": time.perf_counter() - started}
    return result


def main(argv=None) -> int:
    set_offline()
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .cli import output_path_problem
    for flag, value in (("json", args.json or config.output.json),
                        ("plot", args.plot or config.output.plot)):
        problem = output_path_problem(value) if value else None
        if problem:
            print(f"error: --{flag} / output.{flag}: {problem}", file=sys.stderr)
            return 2
    if args.rule:
        named = RULES[args.rule]
        config = dataclasses.replace(config, rule=RuleConfig(
            name=named.name, k_thresholds=named.k_thresholds, v_thresholds=named.v_thresholds,
            topk=named.topk, v_bias=named.v_bias, v_skip=named.v_skip))
    try:
        result = run(config, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ModelUnavailableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TraceFormatError as exc:
        print(f"error: --trace: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    json_path = args.json or config.output.json
    if json_path:
        path = Path(json_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=json_default) + "\n")
        print(f"wrote {path}")
    plot_path = args.plot or config.output.plot
    if plot_path:
        print(f"wrote {write_plot(result, plot_path)}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
