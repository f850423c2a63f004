"""Shared pytest setup: the ``gpu`` marker's skipping and the ``rng`` fixture.

* Tests marked ``@pytest.mark.gpu`` are skipped with "no CUDA device: <why>" when no device
  can be opened. The check goes through the CUDA driver API (``cuda.bindings``), once per
  session, and never imports torch. Set ``AKV_REQUIRE_GPU=1`` to turn those skips into a
  collection error instead (on a GPU machine, so that a broken driver can't hide as skips).
* ``rng`` is a fresh ``numpy.random.Generator`` per test, seeded from ``os.urandom``. Its seed
  is printed (pytest shows captured output of a failing test) and stored in the test's
  ``user_properties``; ``AKV_TEST_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest


@functools.cache
def cuda_device_status() -> tuple[bool, str]:
    """``(True, "N device(s)")`` when the CUDA driver initialises and sees a device, else
    ``(False, why)``. Cached: the driver is asked once per session."""
    try:
        from cuda.bindings import driver
    except Exception as e:  # noqa: BLE001 - any import failure means "no device here"
        return False, f"cannot import cuda.bindings.driver ({type(e).__name__}: {e})"
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return False, f"cuInit failed: {err.name}"
        err, count = driver.cuDeviceGetCount()
        if err != driver.CUresult.CUDA_SUCCESS:
            return False, f"cuDeviceGetCount failed: {err.name}"
    except Exception as e:  # noqa: BLE001 - e.g. no libcuda.so: the driver isn't installed
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"{type(e).__name__}: {msg}"
    if count == 0:
        return False, "the driver reports 0 devices"
    return True, f"{count} device(s)"


@pytest.fixture(scope="session")
def cuda_device() -> str:
    """For tests that need to know: the device status string, skipping when there is none."""
    ok, why = cuda_device_status()
    if not ok:
        pytest.skip(f"no CUDA device: {why}")
    return why


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return  # don't touch the driver when no selected test needs it
    ok, why = cuda_device_status()
    if ok:
        return
    if os.environ.get("AKV_REQUIRE_GPU", "") not in ("", "0"):
        raise pytest.UsageError(f"AKV_REQUIRE_GPU is set but there is no CUDA device: {why}")
    skip = pytest.mark.skip(reason=f"no CUDA device: {why}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A fresh generator seeded from os.urandom (or ``$AKV_TEST_SEED``); the seed is reported."""
    env_seed = os.environ.get("AKV_TEST_SEED")
    seed = int(env_seed, 0) if env_seed else int.from_bytes(os.urandom(8), "little")
    request.node.user_properties.append(("rng_seed", seed))
    # Captured, so pytest shows it with the failure; rerun with AKV_TEST_SEED to replay.
    print(f"rng seed: {seed} (replay: AKV_TEST_SEED={seed} pytest '{request.node.nodeid}')")
    return np.random.default_rng(seed)
