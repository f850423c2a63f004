"""Hugging Face transformers integration: ``model.generate(..., past_key_values=AlignedCache)``.

Two pieces, for transformers 5.x (tested with 5.17 and 5.24):

* :class:`AlignedCache`, a ``transformers.Cache`` backed by an
  :class:`~akv_runtime.cache.AlignedKVCache`. ``update`` appends the new tokens' K/V (fp16,
  post-RoPE, ``[batch, kv_heads, new_tokens, head_dim]``) to the bit planes and hands back
  only the fresh K/V; the cache keeps no fp16 copy.
* :data:`ATTENTION_NAME` (``"akv_aligned"``), an attention function registered through
  ``AttentionInterface`` (and ``sdpa``'s mask function through ``AttentionMaskInterface``).
  For a layer whose K/V an :class:`AlignedCache` just took:

  - a decode step (one query token) is served by ``AlignedKVCache.attend(layer, q)`` – the
    precision-aligned decode attention of the runtime (CUDA kernels on torch's current stream,
    read through DLPack-compatible pointers; or the numpy reference on a CPU), GQA included;
    with ``AlignedCache(..., strict=True)`` (or ``cache.strict = True`` between calls) it
    reads all 16 bits, i.e. exact fp16 attention from the same cache;
  - a prefill (several query tokens on an empty cache) is plain torch SDPA on the fresh K/V.

  Any other call (e.g. a stock ``DynamicCache``) goes to transformers' SDPA unchanged, so one
  model serves both the aligned cache and the fp16 baseline.

Not supported, with a clear error: attention masks that mask positions (left padding: use
batch 1 or prompts of equal length), chunked prefill into a non-empty cache, beam search and
other cache reordering, dropout, a score scale other than ``1/sqrt(head_dim)``.

Usage::

    from akv_runtime.integrations.hf import AlignedCache
    cache = AlignedCache.for_model(model, max_seq_len=1024)   # switches model's attention
    out = model.generate(ids, max_new_tokens=32, do_sample=False, past_key_values=cache)
"""

from __future__ import annotations

import inspect
import threading
import weakref

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import AlignedKVCache, check_bool
from ..reference import SEED_RULE, check_mode

#: The attention implementation name registered with transformers.
ATTENTION_NAME = "akv_aligned"

_handoff = threading.local()


class UnsupportedByAlignedCache(ValueError):
    """A call the aligned cache does not serve (padding masks, reordering, ...)."""


# --------------------------------------------------------------------------- the cache


class AlignedLayer(CacheLayerMixin):
    """One decoder layer's view of the shared :class:`AlignedKVCache` (transformers calls
    these through :class:`AlignedCache`)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, store: AlignedKVCache, layer: int):
        super().__init__()
        self.store, self.layer = store, layer

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(self.layer, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return int(self.store.lengths(self.layer).max())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.store.capacity

    def reset(self) -> None:  # the whole store is reset by AlignedCache.reset
        pass

    def reorder_cache(self, beam_idx) -> None:
        raise UnsupportedByAlignedCache("the aligned cache does not reorder sequences "
                                        "(beam search); use do_sample=False, num_beams=1")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise UnsupportedByAlignedCache("the aligned cache cannot be cropped (assisted "
                                            "decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise UnsupportedByAlignedCache("the aligned cache has a fixed batch; "
                                            "num_return_sequences > 1 is not supported")

    def batch_select_indices(self, indices) -> None:
        raise UnsupportedByAlignedCache("the aligned cache cannot select sequences")


class AlignedCache(Cache):
    """A transformers ``Cache`` whose K/V live in an :class:`AlignedKVCache`.

    Parameters
    ----------
    store : AlignedKVCache
        One cache layer per decoder layer; its batch size is the generation batch.
    count : bool
        Count the bytes each decode attention reads (``attend(count=True)``). Without an
        observer the store's counters accumulate over all decode steps; with one they are
        reset before each call, so that the observer reads that call's bytes.
    observer : callable, optional
        ``observer(store, layer, q, out)`` after every decode attention (q, out fp16
        ``[batch, query_heads, head_dim]``); with ``count`` the store's counters hold exactly
        that call's bytes. :class:`akv_runtime.workload.DecodeMeter.observe` fits.
    mode : {"aligned", "full"}
        The decode attention's mode.
    strict : bool
        Read all 16 bits on every decode step (``attend(..., strict=True)``): exact fp16
        attention from the same planes, whatever ``mode`` says. An attribute, so a caller
        can switch it between requests (or steps) on one cache. Default ``False``.

    The model must run the ``akv_aligned`` attention (:func:`use_aligned_attention`;
    :meth:`for_model` switches it): ``update`` hands back only the fresh K/V, so under any
    other attention a decode step would attend to its own token alone. Each cache remembers
    the layer whose K/V it handed out last until the ``akv_aligned`` attention (or
    :meth:`decode_attention`) takes them; the next ``update`` of a cache whose hand-off was
    not taken raises :class:`UnsupportedByAlignedCache` before appending (:meth:`reset`
    forgets it).

    Raises
    ------
    TypeError
        ``strict`` or ``count`` is not a bool.
    ValueError
        ``mode`` is not one of ``("aligned", "full")``.
    """

    def __init__(self, store: AlignedKVCache, *, count: bool = False, observer=None,
                 mode: str = "aligned", strict: bool = False):
        super().__init__(layers=[AlignedLayer(store, i) for i in range(store.num_layers)])
        self.store = store
        self.count = check_bool("count", count)
        self.observer = observer
        self.mode = mode
        self.strict = strict
        self._untaken = None          # the layer whose K/V update handed out, until taken
        self._ref = weakref.ref(self)   # what the hand-off holds (one per cache, not per call)
        #: the model's attention implementation before :meth:`for_model` switched it
        self.previous_attention = None

    @property
    def mode(self) -> str:
        """The decode attention's mode, ``"aligned"`` or ``"full"`` (checked when set)."""
        return self._mode

    @mode.setter
    def mode(self, value) -> None:
        check_mode(value)
        self._mode = value

    @property
    def strict(self) -> bool:
        """Whether decode steps read all 16 bits (see the class docstring)."""
        return self._strict

    @strict.setter
    def strict(self, value) -> None:
        self._strict = check_bool("strict", value)

    @classmethod
    def for_model(cls, model, max_seq_len: int, *, batch_size: int = 1, rule=SEED_RULE,
                  v_rule: str = "auto", backend: str = "auto", **kwargs) -> "AlignedCache":
        """An empty cache with the model's attention shapes (backend ``cuda`` when the model
        is on a GPU and ``auto`` is asked); ``rule`` and ``v_rule`` as
        :class:`~akv_runtime.cache.AlignedKVCache` takes them. Switches ``model`` to the
        ``akv_aligned`` attention (:func:`use_aligned_attention`), under which stock caches
        get transformers' SDPA; the previous implementation's name is kept in
        ``cache.previous_attention`` (``model.set_attn_implementation(name)`` restores it,
        e.g. for a model loaded with eager attention)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if backend == "auto":
            backend = "cuda" if model.device.type == "cuda" else "numpy"
        store = AlignedKVCache(config.num_hidden_layers,
                               getattr(config, "num_key_value_heads", None) or heads, head_dim,
                               max_seq_len, num_query_heads=heads, batch_size=batch_size,
                               rule=rule, v_rule=v_rule, backend=backend)
        try:
            cache = cls(store, **kwargs)
        except Exception:
            store.close()
            raise
        cache.previous_attention = use_aligned_attention(model)
        return cache

    # transformers calls update(key_states, value_states, layer_idx, ...)
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        store = self.store
        if key_states.dtype != torch.float16:
            raise TypeError(f"the aligned cache stores fp16 K/V; the model runs in "
                            f"{key_states.dtype} (load it with dtype=torch.float16)")
        batch, _, new, _ = key_states.shape
        if batch != store.batch_size:
            raise UnsupportedByAlignedCache(f"batch of {batch} sequences, the cache was made "
                                            f"for {store.batch_size}")
        if self._untaken is not None:
            layer, self._untaken = self._untaken, None
            raise UnsupportedByAlignedCache(
                f"the {ATTENTION_NAME!r} attention did not receive the K/V this cache handed "
                f"out for layer {layer} (the model is on another attention, which would "
                f"attend to the newest token alone, or it changed K between the cache's "
                f"update and the attention): switch the model with akv_runtime.integrations."
                f"hf.use_aligned_attention(model) (AlignedCache.for_model does), then "
                f"cache.reset() and run again")
        start = int(store.lengths(layer_idx).max())
        if new > 1 and start > 0:
            raise UnsupportedByAlignedCache(
                f"layer {layer_idx}: {new} new tokens into a cache that already holds {start}; "
                f"chunked prefill is not supported (prefill once, then decode one token at a "
                f"time)")
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        self._untaken = layer_idx
        _handoff.pending = (self._ref, layer_idx, keys)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.store.capacity

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return self.store.batch_size

    def reset(self) -> None:
        self._untaken = None
        self.store.reset()

    # ---------------------------------------------------------------- decode
    def decode_attention(self, layer: int, query, module=None):
        """Aligned decode attention of one query token per sequence: ``query``
        ``[batch, heads, 1, D]`` (fp16) → output ``[batch, 1, heads, D]`` as transformers
        attention functions return it."""
        if self._untaken == layer:
            self._untaken = None
        q = query[:, :, 0, :]
        store = self.store
        if self.count and self.observer is not None:
            store.reset_counters()  # the observer reads this call's bytes
        out = store.attend(layer, q, mode=self.mode, count=self.count, strict=self.strict)
        if self.observer is not None:
            self.observer(store, layer, q, out)
        return out.unsqueeze(1)


# --------------------------------------------------------------------------- attention


def aligned_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                              scaling=None, **kwargs):
    """The ``akv_aligned`` attention function (see the module docstring).

    Parameters follow transformers' attention interface: ``query [B, Hq, q_len, D]``,
    ``key``/``value [B, Hk, kv_len, D]`` as returned by the cache's ``update``.

    Returns
    -------
    (output [B, q_len, Hq, D], None)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    pending = getattr(_handoff, "pending", None)
    layer = getattr(module, "layer_idx", None)
    cache = pending[0]() if pending is not None else None
    if cache is None or pending[2] is not key or pending[1] != layer:
        # not K/V that an AlignedCache just took (e.g. a DynamicCache): stock SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    _handoff.pending = None
    if cache._untaken == layer:
        cache._untaken = None
    q_len = query.shape[2]
    if q_len > 1:  # prefill on an empty cache: plain torch attention on the fresh K/V
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None:
        raise UnsupportedByAlignedCache(
            "the aligned cache's decode attention takes no attention mask; masked positions "
            "(left padding) are not supported: use batch 1 or prompts of equal length")
    if dropout:
        raise UnsupportedByAlignedCache("attention dropout is not supported (eval mode)")
    head_dim = query.shape[-1]
    if scaling is not None and not np.isclose(scaling, head_dim ** -0.5, rtol=1e-6):
        raise UnsupportedByAlignedCache(f"score scale {scaling} differs from 1/sqrt(head_dim)"
                                        f"={head_dim ** -0.5}; the kernels use the latter")
    if query.dtype != torch.float16:
        raise TypeError(f"query: expected float16, got {query.dtype}")
    return cache.decode_attention(layer, query, module), None


def register() -> str:
    """Register :data:`ATTENTION_NAME` with transformers' attention and mask interfaces
    (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTENTION_NAME, aligned_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def use_aligned_attention(model) -> str:
    """Register and switch ``model`` to the ``akv_aligned`` attention; returns the previous
    implementation name. Stock caches keep working (they get SDPA)."""
    register()
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (AttributeError, ValueError):
        pass
    if model.config._attn_implementation != ATTENTION_NAME:
        model.config._attn_implementation = ATTENTION_NAME
    return previous


# --------------------------------------------------------------------------- helpers


def _cache_keyword(model) -> str:
    """``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (older 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model, input_ids, cache):
    """One forward pass through ``cache``; returns the logits ``[B, n, vocab]``.
    Works with both spellings of the cache keyword across transformers 5.x."""
    kwargs = {_cache_keyword(model): cache}
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    return out.logits


def generate(model, input_ids, cache, max_new_tokens: int, **kwargs):
    """Greedy ``model.generate`` through ``cache`` (an :class:`AlignedCache` or a stock
    ``DynamicCache``); returns the new token ids ``[B, max_new_tokens']`` (int64).

    Raises
    ------
    UnsupportedByAlignedCache
        An attention mask with masked positions was given.
    """
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise UnsupportedByAlignedCache("padded batches are not supported: use batch 1 or "
                                        "prompts of equal length")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("num_beams", 1)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
    keyword = _cache_keyword(model)  # generate() takes the same spelling as forward()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             **{keyword: cache}, **kwargs)
    return out[:, input_ids.shape[1]:]


__all__ = ["ATTENTION_NAME", "AlignedCache", "AlignedLayer", "UnsupportedByAlignedCache",
           "aligned_attention_forward", "forward", "generate", "register",
           "use_aligned_attention"]
