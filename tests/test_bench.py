"""The benchmark's table and version bookkeeping (CPU; the timings themselves need a GPU)."""

import pytest

from akv_runtime import bench


def _row(shape, default, ms):
    return {"shape": shape, "batch": 8, "context": 16384, "default_version": default,
            "ms": ms, "aligned_speedup_vs_sdpa": ms["sdpa_cudnn"] / ms["akv_aligned"],
            "bytes": {"aligned": {"bits_per_value": {"total": 10.25}}},
            "aligned_bandwidth_TBps": 3.1, "aligned_fraction_of_copy": 0.73}


def test_table_has_a_column_per_version_and_the_default_untagged():
    rows = [
        _row("llama2-7b", 3, {"sdpa_cudnn": 0.485, "sdpa_flash": 0.888, "eager": 0.517,
                              "akv_full": 0.589, "akv_aligned": 0.456,
                              "akv_full_v6": 0.611, "akv_aligned_v6": 0.488}),
        _row("llama3-8b", 6, {"sdpa_cudnn": 0.129, "sdpa_flash": 0.130, "eager": 0.156,
                              "akv_full": 0.248, "akv_aligned": 0.230,
                              "akv_full_v3": 0.294, "akv_aligned_v3": 0.286,
                              "akv_whole": 0.201, "akv_split": 0.213,
                              "akv_whole3": 0.222}),
    ]
    lines = bench.format_table(rows, 4.22e12).splitlines()
    head = lines[1].split()
    assert "v3" in head and "v6" in head          # "algn v3", "algn v6"
    mha, gqa = lines[3].split(), lines[4].split()
    # columns: shape B ctx cudnn flash eager algn-v3 algn-v6 v full aligned whole split
    # whole3 x-cudnn ...
    assert mha[6:9] == ["0.456", "0.488", "3"] and mha[10] == "0.456"
    assert mha[11:14] == ["n/a", "n/a", "n/a"]     # a row without the V-whole timings
    assert gqa[6:9] == ["0.286", "0.230", "6"] and gqa[10] == "0.230"
    assert gqa[11:14] == ["0.201", "0.213", "0.222"]
    assert gqa[14] == f"{0.129 / 0.230:.2f}"


@pytest.mark.parametrize("argv,message", [
    (["--case", "llama2-7b:8"], "expected shape:batch:context"),
    (["--case", "llama2-7b:x:1"], "must be integers"),
    (["--case", "llama2-7b:-4:0"], "must be positive"),
    (["--case", "nosuch:1:1"], "unknown shape"),
    (["--versions", "9"], "known versions"),
    (["--versions", "abc"], "expected numbers"),
    (["--reps", "0"], "--reps"),
])
def test_bad_arguments_are_usage_errors_before_the_gpu_check(argv, message, capsys,
                                                              monkeypatch):
    from akv_runtime import cache
    # even where a GPU would be usable, a bad argument never reaches the timing code
    monkeypatch.setattr(cache, "cuda_unavailable_reason", lambda: pytest.fail("GPU looked for"))
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_json_path_is_refused_first(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--json", str(afile / "x.json")])
    assert exc.value.code == 2 and "--json" in capsys.readouterr().err


def test_json_folder_is_not_created_before_the_gpu_check(tmp_path, monkeypatch):
    """A missing --json folder is checked (its nearest existing ancestor must be a writable
    folder) but only created when the results are written: a run refused for want of a GPU
    leaves nothing behind."""
    from akv_runtime import cache
    monkeypatch.setattr(cache, "cuda_unavailable_reason", lambda: "no GPU in this test")
    target = tmp_path / "new" / "deeper" / "x.json"
    assert bench.main(["--quick", "--json", str(target)]) == 2
    assert not (tmp_path / "new").exists()


def test_group_8_shape_is_a_case_not_part_of_the_grid():
    """llama3-70b (64 query heads over 8 KV heads) is timed with --case only; the full grid
    keeps issue 4's three shapes, every one at batch 1, 8, 32 and at 1 x 128k."""
    assert bench.SHAPES["llama3-70b"] == (64, 8, 128)
    grid = bench.full_grid()
    assert {s for s, _, _ in grid} == set(bench.GRID_SHAPES) == {
        "llama2-7b", "llama3-8b", "smollm2-135m"}
    assert len(grid) == 3 * (3 * 3 + 1)


@pytest.mark.parametrize("name,value", [("AKV_SPLIT_BLOCKS", "0"),
                                        ("AKV_DECODE_VERSION", "nine"),
                                        ("AKV_FUSED", "sometimes"),
                                        ("AKV_WHOLE_KERNEL", "2")])
def test_bad_environment_is_a_usage_error_before_the_gpu_check(name, value, monkeypatch,
                                                               capsys):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--case", "llama2-7b:1:64"])
    assert exc.value.code == 2
    assert f"${name}" in capsys.readouterr().err


class _FakeEvent:
    clock = [0.0]

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = _FakeEvent.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return other.t - self.t


class _FakeGraph:
    """Advances the fake clock by ``ms`` per replay; raises on replay ``fail_at`` (0 = the
    untimed one)."""

    def __init__(self, ms, fail_at=None):
        self.ms, self.fail_at, self.replays = ms, fail_at, 0

    def replay(self):
        self.replays += 1
        if self.fail_at is not None and self.replays > self.fail_at:
            raise RuntimeError("illegal address")
        _FakeEvent.clock[0] += self.ms


class _FakeTorch:
    class cuda:
        Event = _FakeEvent

        @staticmethod
        def synchronize():
            pass


def test_interleaved_timing_medians_and_a_failing_candidate():
    graphs = {"a": _FakeGraph(1.0), "b": _FakeGraph(2.5), "bad": _FakeGraph(9.0, fail_at=3)}
    errors = {}
    ms = bench._interleaved_median_ms(_FakeTorch, graphs, rounds=5, errors=errors)
    assert ms == {"a": 1.0, "b": 2.5, "bad": None}          # the others are still timed
    assert errors == {"bad": "RuntimeError: illegal address"}
    # one untimed replay each, then one per round; the failed one leaves the later rounds
    assert graphs["a"].replays == graphs["b"].replays == 6 and graphs["bad"].replays == 4
    # a failure in the untimed replay: no timed replays at all
    late = {"x": _FakeGraph(1.0, fail_at=0), "y": _FakeGraph(3.0)}
    assert bench._interleaved_median_ms(_FakeTorch, late, rounds=3, errors={}) == {
        "x": None, "y": 3.0}
    assert late["x"].replays == 1
    # without an errors dict the failure propagates (single-graph timings)
    with pytest.raises(RuntimeError, match="illegal address"):
        bench._interleaved_median_ms(_FakeTorch, {"z": _FakeGraph(1.0, fail_at=2)}, rounds=3)
