"""GPU tests of the ragged append (``AlignedKVCache.append(counts=...)``: one ``akv_append``
launch per sequence, on offset pointers) against the numpy reference. The append kernel does
not depend on the decode kernel version, so these run once; the decode call over the mixed
lengths they make runs under the default version and the fused kernel."""

import numpy as np
import pytest

from akv_runtime import reference as R
from akv_runtime.layout import PLANE_NAMES

from test_gpu_kernels import kv_like, make_pair

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("D,Hk,Hq,paged", [(64, 3, 9, True), (128, 2, 8, False),
                                           (128, 4, 4, True)])
@pytest.mark.parametrize("strided", [False, True])
def test_ragged_append_matches_reference(rng, D, Hk, Hq, paged, strided):
    """Ragged prefills (counts 150 / 1 / 64 / 0, then 3 / 0 / 70 / 65: a sequence that
    starts empty, one that skips a round, one that crosses block edges mid-byte), a uniform
    decode token between them: every plane byte, the host and device lengths and the
    arrival counts equal the reference's; every sequence reads back bit for bit; decode
    attention over the mixed lengths (four launches and the fused kernel) matches the
    reference. ``strided``: K/V in Hugging Face's [B, S, Hk, D].transpose(1, 2) layout."""
    B, L = 4, 2
    gpu, cpu = make_pair(rng, L, Hk, Hq, D, B, 320, paged)
    written = [[] for _ in range(B)]

    def both(K, V, counts):
        if strided:
            kt = torch.from_numpy(np.ascontiguousarray(K.transpose(0, 2, 1, 3))).cuda()
            vt = torch.from_numpy(np.ascontiguousarray(V.transpose(0, 2, 1, 3))).cuda()
            kt, vt = kt.transpose(1, 2), vt.transpose(1, 2)
        else:
            kt, vt = torch.from_numpy(K).cuda(), torch.from_numpy(V).cuda()
        gpu.append(1, kt, vt, counts=counts)
        cpu.append(1, K, V, counts=counts)
        n = [K.shape[2]] * B if counts is None else counts
        for b in range(B):
            written[b].append((K[b, :, :n[b]], V[b, :, :n[b]]))

    for S, counts in ((150, [150, 1, 64, 0]), (1, None), (70, [3, 0, 70, 65])):
        K, V = kv_like(rng, B, Hk, S, D)
        both(K, V, counts)
    torch.cuda.synchronize()
    assert gpu.lengths()[1].tolist() == [154, 2, 135, 66]
    assert np.array_equal(gpu.lengths(), cpu.lengths())
    ws = gpu._backend.ws
    assert np.array_equal(torch.from_dlpack(ws["lengths"]).cpu().numpy(), cpu.lengths())
    assert not torch.from_dlpack(ws["append_arrive"]).cpu().numpy().any()
    host, ref = gpu._backend.host_planes(1), cpu._backend.layer_planes(1)
    for name in PLANE_NAMES:
        assert np.array_equal(host[name], ref[name]), name
    for b in range(B):
        want_k = np.concatenate([k for k, _ in written[b]], 1)
        want_v = np.concatenate([v for _, v in written[b]], 1)
        kg, vg = gpu.read(1, b)
        assert np.array_equal(kg.view(np.uint16), want_k.view(np.uint16))
        assert np.array_equal(vg.view(np.uint16), want_v.view(np.uint16))
    q = rng.standard_normal((B, Hq, D)).astype(np.float16)
    qt = torch.from_numpy(q).cuda()
    for fused in (False, "always"):
        gpu._backend.fused = fused
        for mode in ("full", "aligned"):
            ref_out = cpu.attend(1, q, mode=mode, rule="tuned")
            out = gpu.attend(1, qt, mode=mode, rule="tuned").cpu().numpy()
            assert R.relative_error(out, ref_out) < 2e-3, (fused, mode)
