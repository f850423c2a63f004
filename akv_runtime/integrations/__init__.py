"""Integrations of the aligned KV cache with model frameworks.

* :mod:`akv_runtime.integrations.hf` – Hugging Face transformers: a ``Cache`` backed by
  :class:`~akv_runtime.cache.AlignedKVCache` and the ``akv_aligned`` attention function, so
  ``model.generate(..., past_key_values=AlignedCache.for_model(model, ...))`` decodes through
  the precision-aligned decode attention.

Submodules import their framework (torch, transformers) when imported; this package does not.
"""
