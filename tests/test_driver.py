"""CPU tests of the driver layer and the CUDA backend's launches, through a fake driver."""

import ctypes
import hashlib
import json
import warnings

import numpy as np
import pytest

from akv_runtime import driver, kernels
from akv_runtime.arrays import ArrayInfo
from akv_runtime.cache import AlignedKVCache
from akv_runtime.kernels import choose_split, combine_chains, default_decode_version
from akv_runtime.layout import BLOCK_TOKENS, PLANE_NAMES, PlaneLayout
from akv_runtime.reference import NEVER_SKIP

from fake_driver import CUresult, FakeDriver, cuda_sources, parse_kernel_signatures


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Install a fake driver (compute capability 9.0) and a manifest with sm_80 and sm_90."""
    fake = FakeDriver((9, 0))
    monkeypatch.setattr(driver, "_cu", fake)
    for arch in ("sm_80", "sm_90"):
        (tmp_path / arch).mkdir()
        (tmp_path / arch / "akv.cubin").write_bytes(f"cubin for {arch}".encode())
        (tmp_path / arch / "akv_fused.cubin").write_bytes(f"fused cubin for {arch}".encode())
    manifest = {"architectures": {a: {"akv.cubin": {}, "akv_fused.cubin": {}}
                                  for a in ("sm_80", "sm_90")}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("AKV_CUBIN_DIR", str(tmp_path))
    driver._reset_for_tests()
    yield fake
    driver._reset_for_tests()


def test_check_passes_values_and_raises_typed_errors(monkeypatch):
    monkeypatch.setattr(driver, "_cu", FakeDriver())
    assert driver.check((CUresult.CUDA_SUCCESS,)) is None
    assert driver.check((CUresult.CUDA_SUCCESS, 7)) == 7
    assert driver.check((CUresult.CUDA_SUCCESS, 1, 2)) == (1, 2)
    with pytest.raises(driver.CudaError) as info:
        driver.check((CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemAlloc")
    err = info.value
    assert err.code == 2 and err.name == "CUDA_ERROR_OUT_OF_MEMORY"
    assert str(err) == "CUDA_ERROR_OUT_OF_MEMORY: out of memory in cuMemAlloc"


@pytest.mark.parametrize("built,cc,expected", [
    ({"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}, (9, 0), "sm_90"),
    ({"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}, (8, 7), "sm_86"),   # Orin: same major
    ({"sm_80", "sm_90"}, (8, 9), "sm_80"),
    ({"sm_80", "sm_90a"}, (9, 0), "sm_90a"),
])
def test_select_arch(built, cc, expected):
    assert driver.select_arch(built, cc) == expected


@pytest.mark.parametrize("built,cc", [({"sm_80", "sm_90"}, (7, 5)), ({"sm_90a"}, (9, 1)),
                                      ({"sm_86"}, (8, 0)), (set(), (9, 0))])
def test_select_arch_error_names_capability_archs_and_command(built, cc):
    with pytest.raises(driver.NoCubinError) as info:
        driver.select_arch(built, cc)
    msg = str(info.value)
    assert f"compute capability {cc[0]}.{cc[1]}" in msg
    assert f"python build.py --arch sm_{cc[0]}{cc[1]}" in msg
    for arch in built:
        assert arch in msg


def test_device_and_module_selection_with_fake_driver(fake):
    dev = driver.get_device(0)
    assert dev.compute_capability == (9, 0) and dev.name == "Fake GPU" and dev.arch == "sm_90"
    mod = driver.load_module(dev)
    assert mod.arch == "sm_90" and fake.loaded_images == [b"cubin for sm_90"]
    assert driver.load_module(dev) is mod           # cached
    with pytest.raises(driver.CudaError, match="CUDA_ERROR_NOT_FOUND"):
        mod.function("no_such_kernel")
    with pytest.raises(ValueError, match="device_id"):
        driver.get_device(3)


def test_stale_sources_names_changed_and_new_kernel_files(tmp_path):
    src = tmp_path / "cuda"
    src.mkdir()
    (src / "a.cu").write_text("kernel a")
    (src / "b.cuh").write_text("header b")
    (src / "notes.txt").write_text("not a kernel source")
    recorded = {n: hashlib.sha256((src / n).read_bytes()).hexdigest() for n in ("a.cu", "b.cuh")}
    manifest = {"sources": recorded}
    assert driver.stale_sources(manifest, src) == []
    (src / "b.cuh").write_text("header b, edited")
    (src / "c.cu").write_text("a kernel added since the build")
    assert driver.stale_sources(manifest, src) == ["b.cuh", "c.cu"]
    # nothing to compare: no recorded sources, or no cuda/ beside the package
    assert driver.stale_sources({}, src) == []
    assert driver.stale_sources(manifest, tmp_path / "missing") == []


def test_cubins_built_from_other_sources_warn_on_load(fake, tmp_path, monkeypatch):
    src = tmp_path / "cuda"
    src.mkdir()
    (src / "akv.cu").write_text("the kernels as they are now")
    monkeypatch.setattr(driver, "SOURCE_DIR", src)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["sources"] = {"akv.cu": "0" * 64}          # built from other sources
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(driver.StaleCubinWarning, match=r"akv\.cu changed or new.*python build\.py"):
        driver.load_module(driver.get_device(0))
    driver._reset_for_tests()
    manifest["sources"] = {"akv.cu": hashlib.sha256((src / "akv.cu").read_bytes()).hexdigest()}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # up to date: no warning
        assert driver.load_module(driver.get_device(0)).arch == "sm_90"


def test_no_matching_cubin_is_a_clear_error(monkeypatch, fake):
    fake.cc = (7, 5)
    driver._reset_for_tests()
    with pytest.raises(driver.NoCubinError, match="compute capability 7.5.*sm_80, sm_90"):
        driver.load_module(driver.get_device(0))


def test_unavailable_reason_names_the_driver_error(monkeypatch):
    monkeypatch.setattr(driver, "_cu", FakeDriver(fail={"cuInit": CUresult.CUDA_ERROR_NO_DEVICE}))
    driver._reset_for_tests()
    try:
        reason = driver.unavailable_reason()
        assert reason.startswith("CUDA_ERROR_NO_DEVICE: no CUDA-capable device")
        with pytest.warns(RuntimeWarning, match="numpy reference"):
            cache = AlignedKVCache(1, 1, 64, 64)
        assert cache.backend == "numpy"
        with pytest.raises(ValueError, match="backend: 'cuda' is not available"):
            AlignedKVCache(1, 1, 64, 64, backend="cuda")
    finally:
        driver._reset_for_tests()


def test_pack_args_round_trips_through_void_pointers():
    args = [driver.ptr(0xDEADBEEF000), driver.i32(-7), driver.f32(0.125),
            ctypes.c_int64(1 << 40)]
    address, keep = driver.pack_args(args)
    slots = (ctypes.c_void_p * 4).from_address(address)
    assert ctypes.c_uint64.from_address(slots[0]).value == 0xDEADBEEF000
    assert ctypes.c_int32.from_address(slots[1]).value == -7
    assert ctypes.c_float.from_address(slots[2]).value == 0.125
    assert ctypes.c_int64.from_address(slots[3]).value == 1 << 40
    with pytest.raises(TypeError, match="kernel argument 1"):
        driver.pack_args([driver.i32(1), 5])


def test_signatures_parse_every_entry_point():
    sigs = parse_kernel_signatures(cuda_sources())
    assert {"akv_append", "akv_decode_scores_d64", "akv_decode_scores_d128",
            "akv_decode_estimate", "akv_decode_values_d64", "akv_decode_values_d128",
            "akv_decode_combine"} <= set(sigs)
    assert sigs["akv_decode_estimate_short"] == sigs["akv_decode_estimate"]
    # the V-whole path's combine: akv_decode_combine's parameters and split_stats
    combine = sigs["akv_decode_combine"]
    assert sigs["akv_decode_combine_rescale"] == combine[:-1] + ["ptr"] + combine[-1:]
    for D in (64, 128):
        for G in range(1, 9):     # versions 2, 3: one instantiation per head size and group
            assert sigs[f"akv_decode_scores_v2_d{D}_g{G}"] == sigs[f"akv_decode_scores_d{D}"]
            assert sigs[f"akv_decode_values_v2_d{D}_g{G}"] == sigs[f"akv_decode_values_d{D}"]
            v1s, v1v = sigs[f"akv_decode_scores_d{D}"], sigs[f"akv_decode_values_d{D}"]
            # version 3 adds split_blocks (int) after the thresholds / the bias; the V-whole
            # path's values kernels the block statistics and split_stats at the end
            assert sigs[f"akv_decode_scores_v3_d{D}_g{G}"] == v1s[:16] + ["i32"] + v1s[16:]
            assert sigs[f"akv_decode_values_v3_d{D}_g{G}"] == v1v[:13] + ["i32"] + v1v[13:]
            for v in (3, 5, 6, 7):
                assert (sigs[f"akv_decode_values_whole_v{v}_d{D}_g{G}"] ==
                        sigs[f"akv_decode_values_v3_d{D}_g{G}"] + ["ptr"] * 3)
            # the V-whole path's split kernel: the scores kernel's parameters with the three
            # V planes after the K planes, then partial and split_stats before the counters,
            # and the V tier map last
            s3 = sigs[f"akv_decode_scores_v3_d{D}_g{G}"]
            assert (sigs[f"akv_decode_split_whole_v7_d{D}_g{G}"] ==
                    s3[:10] + ["ptr"] * 3 + s3[10:21] + ["ptr"] * 2 + s3[21:] + ["ptr"])
            # the flash kernel takes the split kernel's parameters
            assert (sigs[f"akv_decode_flash_whole_v7_d{D}_g{G}"] ==
                    sigs[f"akv_decode_split_whole_v7_d{D}_g{G}"])
            if G <= 4:            # version 4 (staged): same parameters as version 3
                assert sigs[f"akv_decode_scores_v4_d{D}_g{G}"] == sigs[f"akv_decode_scores_v3_d{D}_g{G}"]
                assert sigs[f"akv_decode_values_v4_d{D}_g{G}"] == sigs[f"akv_decode_values_v3_d{D}_g{G}"]
            else:
                assert f"akv_decode_scores_v4_d{D}_g{G}" not in sigs
            for v in (5, 6, 7):   # versions 5-7 (tensor cores): version 3's parameters
                assert sigs[f"akv_decode_scores_v{v}_d{D}_g{G}"] == sigs[f"akv_decode_scores_v3_d{D}_g{G}"]
                assert sigs[f"akv_decode_values_v{v}_d{D}_g{G}"] == sigs[f"akv_decode_values_v3_d{D}_g{G}"]
            # version 8: its own scores kernel (version 3's parameters), version 7's values
            assert sigs[f"akv_decode_scores_v8_d{D}_g{G}"] == sigs[f"akv_decode_scores_v3_d{D}_g{G}"]
            assert f"akv_decode_values_v8_d{D}_g{G}" not in sigs


def test_combine_chains_spreads_long_sums_while_one_wave_holds_them():
    # batch 1 x 128k, MHA, head_dim 128: 2048 splits, 32 CTAs -> a thread per running sum
    assert combine_chains(2048, 32, 128, 132) == 4
    assert combine_chains(16, 32, 128, 132) == 1            # short sums: one thread each
    # batch 32 x 32k, MHA: 1024 CTAs x 512 threads would fill several waves
    assert combine_chains(64, 1024, 128, 132) == 1
    assert combine_chains(64, 528, 128, 132) == 4           # 270336 threads: one wave


def _info(shape, strides, ptr, dtype=np.float16):
    return ArrayInfo(tuple(shape), tuple(strides), np.dtype(dtype), str(np.dtype(dtype)),
                     "cuda", 0, ptr, None)


def test_close_keeps_memory_that_a_dlpack_consumer_still_views(fake):
    """cache.close() frees a buffer at once, except one that a DLPack export still views:
    that one is freed when the last export's owner object is collected; no new export of a
    closed cache's array is made."""
    import gc
    cache = AlignedKVCache(2, 2, 64, 128, backend="cuda")
    arr = cache.plane("k_hi", 1)
    planes, ws = arr.owner, cache._backend.ws["lengths"].owner
    address = planes.ptr
    token = planes.export(arr)               # what DeviceArray.__dlpack__ hands to cuda.core
    assert planes.live_exports == 1 and token.array is arr
    cache.close()
    assert ws.ptr == 0                        # no export: freed now
    assert planes.ptr == address and address in fake.allocations
    with pytest.raises(ValueError, match="memory was freed"):
        arr.__dlpack__()
    del token
    gc.collect()
    assert planes.ptr == 0 and address not in fake.allocations
    with pytest.raises(ValueError, match="memory was freed"):
        arr.__dlpack__()


def test_dlpack_export_hands_cuda_core_a_per_export_owner(fake, monkeypatch):
    """DeviceArray.__dlpack__ builds cuda.core's Buffer with an owner object of its own
    (counted by the buffer while it lives), not the array itself."""
    import gc
    import types
    import cuda.core
    import cuda.core.utils
    owners = []
    monkeypatch.setattr(cuda.core, "Buffer", types.SimpleNamespace(
        from_handle=lambda ptr, size, owner=None: owners.append((ptr, size, owner)) or "buf"))
    monkeypatch.setattr(cuda.core.utils, "StridedMemoryView", types.SimpleNamespace(
        from_buffer=lambda buf, shape, dtype=None: types.SimpleNamespace(
            __dlpack__=lambda **kw: ("capsule", buf, shape, dtype))))
    cache = AlignedKVCache(1, 2, 64, 64, backend="cuda")
    arr = cache.plane("v_hi", 0)
    assert arr.__dlpack__()[0] == "capsule"
    (ptr, size, owner), = owners
    assert (ptr, size) == (arr.ptr, arr.nbytes) and owner.array is arr
    assert arr.owner.live_exports == 1
    del owner, owners[:]
    gc.collect()
    assert arr.owner.live_exports == 0
    cache.close()


def test_ragged_append_launches_one_sequence_at_a_time(fake):
    """append(counts=...) with counts that differ: one akv_append launch per sequence with a
    count > 0, every per-sequence pointer (K, V, lengths, arrival count, block-table row)
    offset to that sequence and grid z = 1; the same kernel and argument list as the
    uniform append."""
    B, Hk, Hq, D, L, S = 3, 2, 4, 64, 2, 70
    cache = AlignedKVCache(L, Hk, D, 300, num_query_heads=Hq, batch_size=B, backend="cuda")
    backend = cache._backend
    bps = cache.blocks_per_sequence
    k = _info((B, Hk, S, D), (S * Hk * D, D, Hk * D, 1), 0x10000)
    v = _info((B, Hk, S, D), (Hk * S * D, S * D, D, 1), 0x20000)
    fake.launches.clear()
    backend.append(1, k, v, np.zeros(B, np.int64), 0x55, np.array([5, 0, 67]))
    sig = fake.signatures["akv_append"]
    assert [x["name"] for x in fake.launches] == ["akv_append"] * 2
    for launch, b, n in zip(fake.launches, (0, 2), (5, 67)):
        args = launch["args"]
        assert len(args) == len(sig) and launch["stream"] == 0x55
        assert launch["grid"] == (-(-n // BLOCK_TOKENS) + 1, Hk, 1)
        assert args[:8] == [0x10000 + 2 * b * S * Hk * D, 0x20000 + 2 * b * Hk * S * D,
                            S * Hk * D, D, Hk * D, Hk * S * D, S * D, D]
        assert args[8] == n
        assert args[9] == backend._lengths_ptr(1) + 4 * b
        assert args[10] == backend.ws["append_arrive"].ptr + (B + b) * 4
        assert args[11] == backend.ws["block_table"].ptr + 4 * b * bps and args[12] == bps


def test_cuda_backend_launches_match_kernel_signatures(fake):
    B, Hk, Hq, D, L = 2, 3, 9, 64, 2
    cache = AlignedKVCache(L, Hk, D, 300, num_query_heads=Hq, batch_size=B, backend="cuda")
    backend = cache._backend
    backend.fused = False          # the four launches here; the fused kernel's test is below
    assert cache.device.startswith("Fake GPU (compute capability 9.0, cubin sm_90)")
    # a GQA cache (group 3, head_dim 64) starts on version 7's kernels
    assert backend.decode_version == 7 == default_decode_version(3, 64)
    # buffers: one per plane set, zero-filled, the block table uploaded
    table = backend.ws["block_table"].to_numpy()
    assert np.array_equal(table, cache.block_table)
    for name in PLANE_NAMES:
        arr = cache.plane(name, 1)
        assert arr.shape == PlaneLayout(L, cache.layout.num_blocks, Hk, D).plane_shape(name)[1:]
        assert arr.ptr == backend.planes[name].ptr + backend.layer_nbytes[name]
    # a strided prefill append (HF layout [B, S, Hk, D].transpose(1, 2)), on stream 0x55
    S = 70
    k = _info((B, Hk, S, D), (S * Hk * D, D, Hk * D, 1), 0x10000)
    v = _info((B, Hk, S, D), (S * Hk * D, D, Hk * D, 1), 0x20000)
    backend.append(1, k, v, np.zeros(B, np.int64), 0x55)
    append = fake.launches[-1]
    sig = fake.signatures["akv_append"]
    assert len(append["args"]) == len(sig)
    assert append["name"] == "akv_append" and append["stream"] == 0x55
    assert append["grid"] == (-(-S // BLOCK_TOKENS) + 1, Hk, B) and append["block"] == (D, 1, 1)
    assert append["args"][:8] == [0x10000, 0x20000, S * Hk * D, D, Hk * D, S * Hk * D, D, Hk * D]
    assert append["args"][8] == S
    assert append["args"][9] == backend._lengths_ptr(1)           # advanced by the kernel
    assert append["args"][10] == backend.ws["append_arrive"].ptr + B * 4   # layer 1's counts
    # a decode-token append reuses the packed arguments with the new pointers and strides
    k1 = _info((B, Hk, 1, D), (Hk * D, D, Hk * D, 1), 0x70000)
    launches = len(fake.launches)                                   # one launch per append
    backend.append(1, k1, k1, np.full(B, S), 0x55)
    assert fake.launches[-1]["args"][:9] == [0x70000, 0x70000, Hk * D, D, Hk * D, Hk * D, D,
                                             Hk * D, 1]
    assert fake.launches[-1]["grid"] == (2, Hk, B) and len(fake.launches) == launches + 1
    cache._lengths[1] = S
    # decode attention: four launches with the right geometry
    q = _info((B, Hq, D), (Hq * D, D, 1), 0x30000)
    out = _info((B, Hq, D), (Hq * D, D, 1), 0x40000)
    fake.launches.clear()
    backend.set_decode_version(4)
    backend.attend(1, q, out, "aligned", cache.rule, 0x77, False, False)
    names = [x["name"] for x in fake.launches]
    assert names == ["akv_decode_scores_v4_d64_g3", "akv_decode_estimate",
                     "akv_decode_values_v4_d64_g3", "akv_decode_combine"]
    scores, estimate, values, combine = fake.launches
    nblk = -(-S // BLOCK_TOKENS)
    score_split, split = backend.splits(nblk, Hk, B)
    assert split == score_split == 1          # 2 blocks x 3 heads x 2 sequences: no splitting
    # each kernel's split follows its own occupancy (fake: 8 CTAs per SM, 132 SMs): 512
    # blocks x 256 rows fill many waves at the caps; 64 x 32 fit one wave at 2 blocks
    assert backend.splits(512, 32, 8) == (16, 8) and backend.splits(64, 32, 1) == (2, 2)
    assert scores["grid"] == (nblk, Hk, B) and values["grid"] == (nblk, Hk, B)
    assert scores["args"][16] == split and values["args"][14] == split
    assert values["args"][12] == NEVER_SKIP                     # the seed rule never skips
    assert combine["args"][4] == split
    # the 256-thread estimate kernel (18 CTAs: far below 4 per multiprocessor)
    assert estimate["grid"] == (Hq, B, 1) and estimate["block"] == (256, 1, 1)
    assert combine["grid"] == (Hq, B, 1)
    backend.short_estimate = "always"        # the short kernel: one warp per query head
    backend.attend(1, q, out, "aligned", cache.rule, 0x77, False, False)
    short = fake.launches[-3]
    assert short["name"] == "akv_decode_estimate_short"
    assert short["grid"] == (-(-Hq // 4), B, 1) and short["block"] == (128, 1, 1)
    assert short["args"] == estimate["args"]
    assert len(short["args"]) == len(fake.signatures["akv_decode_estimate_short"])
    backend.short_estimate = True
    assert all(x["stream"] == 0x77 for x in fake.launches)
    # version 4 stages its planes in opted-in dynamic shared memory (head_dim 64: 8 KB stages,
    # 8 for values, 6 for scores)
    assert values["smem"] == 8 * 2 * 64 * D and scores["smem"] == 6 * 2 * 64 * D
    assert fake.function_attributes[(values["name"],
                                     "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES")] == values["smem"]
    assert scores["args"][0] == 0x30000 and combine["args"][-1] == 0x40000
    assert abs(scores["args"][12] - 1 / np.sqrt(D)) < 1e-7    # scale
    assert scores["args"][13] == 0                             # aligned
    assert scores["args"][-2] == 0 and scores["args"][-1] == 0  # no counters, no debug maps
    # packed arguments are reused, per-call values rewritten: a new q, output and length
    q2 = _info((B, Hq, D), (2 * Hq * D, 2 * D, 1), 0x50000)
    out2 = _info((B, Hq, D), (Hq * D, D, 1), 0x60000)
    cache._lengths[1] = 200
    backend.attend(1, q2, out2, "aligned", cache.rule, 0x77, False, False)
    assert fake.launches[-4]["args"][:3] == [0x50000, 2 * Hq * D, 2 * D]
    assert fake.launches[-1]["args"][-1] == 0x60000
    assert fake.launches[-4]["grid"] == (-(-200 // BLOCK_TOKENS), Hk, B)
    backend.attend(1, q, out, "full", cache.rule, 0, True, False)
    # full mode: the V-whole path, by default the flash kernel and the combine (no
    # estimate; docs/design.md); the split kernel takes the same arguments and split rule
    for kernel, name in (("flash", "akv_decode_flash_whole_v7_d64_g3"),
                         ("split", "akv_decode_split_whole_v7_d64_g3")):
        assert backend.whole_kernel == "flash" or kernel == "split"
        backend.whole_kernel = kernel
        backend.attend(1, q, out, "full", cache.rule, 0, True, False)
        one, combine = fake.launches[-2:]
        assert [x["name"] for x in (one, combine)] == [name, "akv_decode_combine_rescale"]
        args = one["args"]
        assert len(args) == len(fake.signatures[name])
        assert args[:3] == [0x30000, Hq * D, D] and args[16] == 1   # q, full mode
        nblk = -(-200 // BLOCK_TOKENS)           # the length set above
        assert args[19] == backend.whole_split(nblk, Hk, B) == combine["args"][4]
        assert one["grid"] == (-(-nblk // args[19]), Hk, B)
        assert one["block"] == (128, 1, 1)
        assert args[20:26] == [backend.ws[n].ptr for n in ("scores", "block_max", "block_sum",
                                                           "block_arg", "partial",
                                                           "split_stats")]
        assert args[26] == backend.ws["counters"].ptr and args[27:] == [0, 0]
        assert combine["args"][-2:] == [backend.ws["split_stats"].ptr, out.ptr]
        backend.attend(1, q, out, "aligned", cache.rule, 0, False, False, True)   # v_whole
        assert fake.launches[-2]["name"] == name
        assert fake.launches[-2]["args"][16] == 0 and fake.launches[-2]["args"][26] == 0
    # whole_kernel "three": the version's three launches
    backend.whole_kernel = "three"
    backend.attend(1, q, out, "full", cache.rule, 0, True, False)
    scores, values, combine = fake.launches[-3:]
    assert [x["name"] for x in (scores, values, combine)] == [
        "akv_decode_scores_v4_d64_g3", "akv_decode_values_whole_v4_d64_g3",
        "akv_decode_combine_rescale"]
    assert scores["args"][13] == 1 and scores["args"][-2] == backend.ws["counters"].ptr
    assert values["args"][-3:] == [backend.ws[n].ptr for n in
                                   ("block_max", "block_sum", "split_stats")]
    assert combine["args"][-2:] == [backend.ws["split_stats"].ptr, out.ptr]
    # an aligned call left out of the V rule (v_whole) takes the same path with K tiers
    backend.attend(1, q, out, "aligned", cache.rule, 0, True, False, True)
    assert [x["name"] for x in fake.launches[-3:]] == [
        "akv_decode_scores_v4_d64_g3", "akv_decode_values_whole_v4_d64_g3",
        "akv_decode_combine_rescale"]
    assert fake.launches[-3]["args"][13] == 0
    backend.whole_kernel = "flash"
    backend.set_decode_version(1)
    backend.attend(1, q, out, "aligned", cache.rule, 0, False, False)
    assert [x["name"] for x in fake.launches[-4:]] == [
        "akv_decode_scores_d64", "akv_decode_estimate", "akv_decode_values_d64",
        "akv_decode_combine"]
    assert fake.launches[-1]["args"][4] == 1   # one block per split before version 3
    assert fake.launches[-1]["block"] == (D, 1, 1)   # 4 splits: one thread per channel
    backend.set_decode_version(6)
    backend.attend(1, q, out, "aligned", cache.rule, 0, False, False)
    assert [x["name"] for x in fake.launches[-4:]] == [
        "akv_decode_scores_v6_d64_g3", "akv_decode_estimate", "akv_decode_values_v6_d64_g3",
        "akv_decode_combine"]
    assert fake.launches[-2]["args"][14] == split and fake.launches[-2]["smem"] == 0
    backend.set_decode_version(8)     # version 8: its scores kernel, version 7's values
    backend.attend(1, q, out, "aligned", cache.rule, 0, False, False)
    assert [x["name"] for x in fake.launches[-4:]] == [
        "akv_decode_scores_v8_d64_g3", "akv_decode_estimate", "akv_decode_values_v7_d64_g3",
        "akv_decode_combine"]
    # its split model counts a warp's share (a quarter of the split): 64 blocks x 32 rows
    # fit one wave at one block per warp, 4 per CTA (version 6 above: 2 per CTA)
    assert backend.splits(512, 32, 8) == (16, 8) and backend.splits(64, 32, 1) == (4, 2)
    assert fake.launches[-4]["args"][16] == backend.splits(nblk, Hk, B)[0] == 4
    with pytest.raises(ValueError, match="decode version"):
        backend.set_decode_version(9)
    cache.close()
    # version 4 has no kernels for GQA groups above 4: such caches run version 3
    big_group = AlignedKVCache(1, 1, 128, 64, num_query_heads=8, backend="cuda")
    big_group._backend.set_decode_version(4)
    assert big_group._backend.decode_version == 3
    # MHA caches start on version 3 (measured fastest there, docs/perf-notes.md)
    mha = AlignedKVCache(1, 2, 128, 64, backend="cuda")
    assert mha._backend.decode_version == 3 == default_decode_version(1, 128)
    # the short estimate kernel where the 256-thread one would run more than 4 CTAs per
    # multiprocessor (Hq x B = 4 x 140 > 4 x 132), for up to 64 blocks per sequence (the
    # longest of the batch)
    B = 140
    longer = AlignedKVCache(1, 1, 64, 65 * BLOCK_TOKENS, num_query_heads=4, batch_size=B,
                            backend="cuda")
    longer._backend.fused = False
    q = _info((B, 4, 64), (256, 64, 1), 0x30000)
    for n, name in ((64 * BLOCK_TOKENS, "akv_decode_estimate_short"),
                    (64 * BLOCK_TOKENS + 1, "akv_decode_estimate")):
        longer._lengths[0] = n
        longer._lengths[0][0] = 3
        longer._backend.attend(0, q, q, "aligned", longer.rule, 0, False, False)
        assert fake.launches[-3]["name"] == name
    longer._backend.short_estimate = False
    longer._lengths[0] = 64 * BLOCK_TOKENS
    longer._backend.attend(0, q, q, "aligned", longer.rule, 0, False, False)
    assert fake.launches[-3]["name"] == "akv_decode_estimate"
    # 132 sequences: 528 CTAs, 4 per multiprocessor, stay on the 256-thread kernel
    fewer = AlignedKVCache(1, 1, 64, 64 * BLOCK_TOKENS, num_query_heads=4, batch_size=132,
                           backend="cuda")
    fewer._backend.fused = False
    fewer._lengths[0] = 64 * BLOCK_TOKENS
    q132 = _info((132, 4, 64), (256, 64, 1), 0x30000)
    fewer._backend.attend(0, q132, q132, "aligned", fewer.rule, 0, False, False)
    assert fake.launches[-3]["name"] == "akv_decode_estimate"


def test_fused_kernel_launch(fake):
    """The fused kernel (cuda/akv_fused.cu): one launch of clusters per decode call where it
    serves (up to 64 blocks per sequence, compute capability 9.0), grid (cluster, Hk, B),
    its dynamic shared memory opted in, clusters of 16 allowed; the four launches above 64
    blocks and when switched off; not loaded below compute capability 9.0."""
    B, Hk, Hq, D = 3, 2, 8, 128
    cache = AlignedKVCache(1, Hk, D, 65 * BLOCK_TOKENS, num_query_heads=Hq, batch_size=B,
                           backend="cuda")
    backend = cache._backend
    # 6 clusters (3 sequences x 2 KV heads): above FUSED_MAX_CLUSTERS, the four launches by
    # default; one sequence (2 clusters) takes the fused kernel
    assert not backend._use_fused(64, Hk, B) and backend._use_fused(64, Hk, 2)
    assert not backend._use_fused(65, Hk, 1)
    backend.fused = "always"
    name = "akv_decode_fused_d128_g4"
    sig = fake.signatures[name]
    assert fake.function_attributes[(name, "CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED")] == 1
    assert fake.function_attributes[(name, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES")] == \
        kernels.fused_smem_bytes(D, 4, kernels.FUSED_MAX_BPC)
    q = _info((B, Hq, D), (Hq * D, D, 1), 0x30000)
    out = _info((B, Hq, D), (Hq * D, D, 1), 0x40000)
    for n, cluster, bpc in ((1, 8, 1), (32 * BLOCK_TOKENS, 8, 4), (32 * BLOCK_TOKENS + 1, 16, 3),
                            (64 * BLOCK_TOKENS, 16, 4)):
        cache._lengths[0] = n
        cache._lengths[0][0] = 1            # the longest sequence sets the geometry
        fake.launches.clear()
        backend.attend(0, q, out, "aligned", cache.rule, 0x77, False, False)
        (launch,) = fake.launches
        assert launch["name"] == name and len(launch["args"]) == len(sig)
        assert launch["grid"] == (cluster, Hk, B) and launch["block"] == (512, 1, 1)
        assert launch["cluster"] == cluster and launch["stream"] == 0x77
        assert launch["smem"] == kernels.fused_smem_bytes(D, 4, bpc)
        args = launch["args"]
        assert args[:3] == [0x30000, Hq * D, D] and args[25] == 0x40000
        assert args[24] == bpc and args[23] == cache.rule.topk
        assert args[-5:] == [0, 0, 0, 0, 0]   # no counters, tier maps or debug outputs
    # a repeated launch reuses its launch config (built once per geometry and stream)
    configs = dict(driver._LAUNCH_CONFIGS)
    backend.attend(0, q, out, "aligned", cache.rule, 0x77, False, False)
    assert driver._LAUNCH_CONFIGS == configs and len(configs) == 4
    backend.fused_cluster = 8               # forced: 64 blocks in 8 CTAs of 8
    backend.attend(0, q, out, "aligned", cache.rule, 0, True, False)
    assert fake.launches[-1]["grid"] == (8, Hk, B) and fake.launches[-1]["args"][24] == 8
    assert fake.launches[-1]["args"][16] == 0 and fake.launches[-1]["args"][26] == \
        backend.ws["counters"].ptr
    # V read whole (full mode, or v_whole) never takes the fused kernel: the V-whole path
    for mode, whole in (("full", False), ("aligned", True)):
        backend.attend(0, q, out, mode, cache.rule, 0, True, False, whole)
        assert fake.launches[-1]["name"] == "akv_decode_combine_rescale"
    backend.fused_cluster = None
    cache._lengths[0] = 64 * BLOCK_TOKENS + 1                       # 65 blocks: four launches
    fake.launches.clear()
    backend.attend(0, q, out, "aligned", cache.rule, 0, False, False)
    assert len(fake.launches) == 4 and fake.launches[0]["name"].startswith("akv_decode_scores")
    cache._lengths[0] = 64
    backend.fused = True                    # by default: 6 clusters, the four launches
    fake.launches.clear()
    backend.attend(0, q, out, "aligned", cache.rule, 0, False, False)
    assert len(fake.launches) == 4
    backend.fused = False
    fake.launches.clear()
    backend.attend(0, q, out, "aligned", cache.rule, 0, False, False)
    assert len(fake.launches) == 4
    with pytest.raises(ValueError, match="cluster"):
        kernels.fused_geometry(64, 4)
    with pytest.raises(ValueError, match="nblk"):
        kernels.fused_geometry(65)
    cache.close()
    fake.cc = (8, 0)
    driver._reset_for_tests()
    older = AlignedKVCache(1, Hk, D, 64, num_query_heads=Hq, backend="cuda")
    assert older._backend.k_fused is None
    older.close()


def test_fused_kernel_falls_back_where_it_cannot_run(fake, monkeypatch, tmp_path):
    """Where clusters of 16 do not fit, the fused kernel runs in clusters of 8; where the
    driver refuses its shared memory, or the build has no akv_fused.cubin, the cache is
    created all the same and every call takes the four launches."""
    B, Hk, Hq, D = 1, 2, 8, 128
    q = _info((B, Hq, D), (Hq * D, D, 1), 0x30000)
    fake.clusters = {16: 0}
    cache = AlignedKVCache(1, Hk, D, 64 * BLOCK_TOKENS, num_query_heads=Hq, backend="cuda")
    assert cache._backend.fused_max_cluster == 8
    cache._lengths[0] = 64 * BLOCK_TOKENS
    fake.launches.clear()
    cache._backend.attend(0, q, q, "aligned", cache.rule, 0, False, False)
    (launch,) = fake.launches
    assert launch["cluster"] == 8 and launch["grid"] == (8, Hk, B) and launch["args"][24] == 8
    cache.close()
    fake.clusters = {}
    fake.fail["cuFuncSetAttribute"] = CUresult.CUDA_ERROR_INVALID_VALUE
    refused = AlignedKVCache(1, Hk, D, 64, num_query_heads=Hq, backend="cuda")
    assert refused._backend.k_fused is None
    refused._lengths[0] = 64
    fake.launches.clear()
    refused._backend.attend(0, q, q, "aligned", refused.rule, 0, False, False)
    assert len(fake.launches) == 4
    refused.close()
    del fake.fail["cuFuncSetAttribute"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for files in manifest["architectures"].values():
        files.pop("akv_fused.cubin")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    driver._reset_for_tests()
    older_build = AlignedKVCache(1, Hk, D, 64, num_query_heads=Hq, backend="cuda")
    assert older_build._backend.k_fused is None
    older_build.close()


def test_host_constants_match_the_kernels():
    """Launch geometry the host derives from constants of cuda/akv.cu: the short estimate
    kernel's warps (query heads) per CTA and its block limit, the combine kernel's threads
    per channel, the estimate kernel's block size."""
    import re
    from akv_runtime import kernels

    src = cuda_sources()

    def const(name):
        m = re.search(rf"constexpr int {name} = (\d+);", src)
        assert m, name
        return int(m.group(1))

    assert kernels.SHORT_ESTIMATE_HEADS == const("kShortEstimateWarps")
    assert kernels.SHORT_ESTIMATE_BLOCKS == const("kEstimateSelectAbove")
    assert kernels.COMBINE_CHAINS == const("kCombineChains")
    assert kernels.ESTIMATE_THREADS == const("kEstimateThreads")
    assert kernels.FUSED_THREADS == const("kFusedThreads")
    assert kernels.FUSED_MAX_BLOCKS == const("kFusedMaxBlocks")
    assert kernels.FUSED_MAX_BPC == const("kFusedMaxBpc")


def test_choose_split_fills_whole_waves():
    # batch 1 x 16k, MHA (32 KV heads): 6 scores CTAs per SM on 132 SMs = 792 slots. 8
    # blocks per CTA would launch 1024 CTAs (1.29 waves); 11 launch 768 (one wave). Measured
    # on the H200: scores phase 0.0508 -> 0.041 ms (docs/perf-notes.md)
    assert choose_split(256, 32, 792, 16) == 11
    assert choose_split(64, 32, 792, 16) == 3          # batch 1 x 4k: 704 CTAs, not 1024
    assert choose_split(256, 256, 1056, 8) == 8        # many waves: the cap
    assert choose_split(2, 6, 1056, 8) == 1            # tiny: one block per CTA
    assert choose_split(5, 1, 1, 16) == 5              # one slot: one CTA, all blocks
    for bad in ((0, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0), (2.5, 1, 1, 1),
                (1, True, 1, 1)):
        with pytest.raises(ValueError):
            choose_split(*bad)


def test_default_decode_version_by_group():
    assert [default_decode_version(g, 128) for g in range(1, 9)] == [3, 7, 7, 7, 7, 7, 7, 7]
    assert [default_decode_version(g, 64) for g in range(1, 9)] == [3, 7, 7, 7, 7, 7, 7, 7]
    with pytest.raises(ValueError, match="group"):
        default_decode_version(0, 128)
    with pytest.raises(ValueError, match="head_dim"):
        default_decode_version(4, 96)


@pytest.mark.parametrize("name,value,message", [
    ("AKV_DECODE_VERSION", "abc", r"\$AKV_DECODE_VERSION: expected one of .*'abc'"),
    ("AKV_DECODE_VERSION", "10", r"\$AKV_DECODE_VERSION: expected one of .*'10'"),
    ("AKV_DECODE_VERSION", "0", r"\$AKV_DECODE_VERSION"),
    ("AKV_SPLIT_BLOCKS", "0", r"\$AKV_SPLIT_BLOCKS: expected 1\.\.16 .*'0'"),
    ("AKV_SPLIT_BLOCKS", "17", r"\$AKV_SPLIT_BLOCKS: expected 1\.\.16 .*'17'"),
    ("AKV_SPLIT_BLOCKS", "x", r"\$AKV_SPLIT_BLOCKS"),
    ("AKV_FUSED", "yes", r"\$AKV_FUSED: expected 0, 1 or always, got 'yes'"),
    ("AKV_WHOLE_KERNEL", "1", r"\$AKV_WHOLE_KERNEL: expected one of flash, split, three, got '1'"),
])
def test_bad_environment_variables_are_named(fake, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        AlignedKVCache(1, 2, 64, 128, backend="cuda")
    # the numpy backend has no kernel versions or splits: it ignores both
    AlignedKVCache(1, 2, 64, 128, backend="numpy").close()


def test_environment_variables_pick_version_and_split(fake, monkeypatch):
    monkeypatch.setenv("AKV_DECODE_VERSION", " 5 ")
    monkeypatch.setenv("AKV_SPLIT_BLOCKS", "3")
    cache = AlignedKVCache(1, 4, 128, 64 * 100, backend="cuda")
    assert cache._backend.decode_version == 5
    assert cache._backend.splits(100, 4, 1) == (3, 3)
    assert cache._backend.fused is True         # unset: where measured faster
    cache.close()
    for value, expected in (("0", False), ("1", True), (" always ", "always")):
        monkeypatch.setenv("AKV_FUSED", value)
        cache = AlignedKVCache(1, 4, 128, 64 * 100, backend="cuda")
        assert cache._backend.fused == expected
        cache.close()
    for value, expected in (("", "flash"), (" split ", "split"), ("three", "three"),
                            ("flash", "flash")):
        monkeypatch.setenv("AKV_WHOLE_KERNEL", value)
        cache = AlignedKVCache(1, 4, 128, 64 * 100, backend="cuda")
        assert cache._backend.whole_kernel == expected
        cache.close()
    # the variable it replaced is no longer read, and says so
    monkeypatch.setenv("AKV_SPLIT_WHOLE", "0")
    monkeypatch.setenv("AKV_WHOLE_KERNEL", "")
    with pytest.warns(UserWarning, match=r"\$AKV_SPLIT_WHOLE is no longer read"):
        cache = AlignedKVCache(1, 4, 128, 64 * 100, backend="cuda")
    assert cache._backend.whole_kernel == "flash"
    cache.close()
    # a forced split above 8 reaches the scores and flash kernels, capped at their 16
    monkeypatch.delenv("AKV_SPLIT_WHOLE")
    monkeypatch.setenv("AKV_SPLIT_BLOCKS", "12")
    cache = AlignedKVCache(1, 4, 128, 64 * 100, backend="cuda")
    assert cache._backend.splits(100, 4, 1) == (12, 8)
    assert cache._backend.whole_split(100, 4, 1) == 12
    cache._backend.whole_kernel = "split"
    assert cache._backend.whole_split(100, 4, 1) == 8
    cache.close()


def test_whole_split_caps_and_caches_per_kernel(fake):
    """The V-whole path's split (CudaBackend.whole_split): the flash kernel's at most
    MAX_FLASH_SPLIT_BLOCKS (16) blocks per CTA, the split kernel's at most MAX_SPLIT_BLOCKS
    (8), each from its own occupancy; the cached choice is per kernel, so switching back
    and forth gives each its own."""
    from akv_runtime import kernels
    cache = AlignedKVCache(1, 1, 128, 64 * 1000, backend="cuda")
    backend = cache._backend
    # 32 sequences x 8 KV heads of 1000 blocks: ~240 blocks per resident CTA, so the caps bind
    args = (1000, 8, 32)
    flash = backend.whole_split(*args)
    backend.whole_kernel = "split"
    split = backend.whole_split(*args)
    backend.whole_kernel = "flash"
    assert backend.whole_split(*args) == flash
    sms = backend.dev.multiprocessors
    assert flash == kernels.choose_split(1000, 256, sms * backend.flash_whole_per_sm, 16)
    assert split == kernels.MAX_SPLIT_BLOCKS == 8 < flash      # the split kernel's cap binds
    # a short call: each kernel's own occupancy decides, below both caps
    for kernel, per_sm, cap in (("flash", backend.flash_whole_per_sm, 16),
                                ("split", backend.split_whole_per_sm, 8)):
        backend.whole_kernel = kernel
        assert backend.whole_split(64, 8, 4) == kernels.choose_split(64, 32, sms * per_sm, cap)
    cache.close()
