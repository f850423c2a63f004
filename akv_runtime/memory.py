"""Device allocations owned by the runtime, exported zero-copy through DLPack.

:class:`DeviceBuffer` owns one ``cuMemAlloc`` allocation and frees it on :meth:`close` or
collection (never raising from ``__del__``); while DLPack consumers still view it, ``close``
defers the free to the last consumer's collection. :class:`DeviceArray` is a typed, shaped
view of part of a buffer; its ``__dlpack__``/``__dlpack_device__`` are cuda.core's
(:class:`cuda.core.utils.StridedMemoryView` over a non-owning :class:`cuda.core.Buffer`
that keeps the owner alive), so ``torch.from_dlpack(array)`` or ``cupy.from_dlpack(array)``
views the same memory with the right dtype and shape (DESIGN.md section 6).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from . import driver


class _Export:
    """The owner handed to cuda.core for one DLPack export (keeps its array alive)."""

    def __init__(self, array):
        self.array = array


class DeviceBuffer:
    """``nbytes`` of device memory on ``device`` (a :class:`driver.Device`), zero-filled.

    ``ptr`` is 0 once the memory is freed."""

    def __init__(self, device, nbytes: int, zero: bool = True):
        self.device = device
        self.nbytes = int(nbytes)
        self.ptr = driver.mem_alloc(self.nbytes)
        self.live_exports = 0       # DLPack exports whose consumers may still read the memory
        self.closing = False        # close() was called (the memory goes with the last export)
        self._lock = threading.Lock()
        if zero:
            driver.memset8(self.ptr, 0, self.nbytes)
            driver.synchronize()

    def export(self, array) -> _Export:
        """An owner object for one DLPack export of ``array`` (a view of this buffer); the
        memory stays allocated until every such object has been collected."""
        with self._lock:
            if not self.ptr or self.closing:
                raise ValueError("this device array's memory was freed (its cache was closed)")
            token = _Export(array)
            self.live_exports += 1
        # not at interpreter exit: a view may still be read by a later exit hook
        weakref.finalize(token, self._export_ended).atexit = False
        return token

    def _export_ended(self) -> None:
        with self._lock:
            self.live_exports -= 1
            free = self.closing and self.live_exports == 0
        if free:
            self._free()

    def close(self) -> None:
        """Free the memory now, or, while DLPack consumers still view it, when the last of
        them is collected (their views stay valid; the buffer's owner must not use it)."""
        with self._lock:
            self.closing = True           # no new export from here on
            if self.live_exports:
                return
        self._free()

    def _free(self) -> None:
        with self._lock:
            ptr, self.ptr = self.ptr, 0
        if ptr:
            try:
                driver.mem_free(ptr)
            except Exception:  # noqa: BLE001 - at shutdown the context may be gone
                pass

    def __del__(self):
        try:
            self._free()    # no export is alive: each one holds this buffer
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass


class DeviceArray:
    """A shaped, typed view of device memory, exported through DLPack.

    Parameters
    ----------
    owner : DeviceBuffer
        Keeps the memory alive as long as this array or any DLPack consumer of it lives.
    offset : int
        Bytes from the start of ``owner``.
    shape : tuple of int
    dtype : numpy dtype
        C-contiguous layout.
    """

    def __init__(self, owner: DeviceBuffer, offset: int, shape, dtype):
        self.owner = owner
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if offset < 0 or offset + self.nbytes > owner.nbytes:
            raise ValueError("DeviceArray: view outside its buffer")
        self.offset = int(offset)

    @property
    def ptr(self) -> int:
        return self.owner.ptr + self.offset

    @property
    def device_id(self) -> int:
        return self.owner.device.ordinal

    def _view(self):
        token = self.owner.export(self)          # ValueError once the memory is freed
        from cuda.core import Buffer
        from cuda.core.utils import StridedMemoryView
        buffer = Buffer.from_handle(self.ptr, self.nbytes, owner=token)
        return StridedMemoryView.from_buffer(buffer, self.shape, dtype=self.dtype)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """Export through DLPack (cuda.core's producer). The runtime's writes are ordered on
        the stream they were launched on; a consumer passing ``stream`` must order itself
        after that work (the runtime launches on the caller's stream, so a caller using one
        stream needs nothing more)."""
        return self._view().__dlpack__(stream=stream, max_version=max_version,
                                       dl_device=dl_device, copy=copy)

    def __dlpack_device__(self):
        return (2, self.device_id)  # kDLCUDA

    def to_numpy(self, stream: int = 0) -> np.ndarray:
        """Copy to the host after ``stream``'s work (tests and debug read-backs)."""
        if not self.owner.ptr:
            raise ValueError("this device array's memory was freed (its cache was closed)")
        host = np.empty(self.shape, self.dtype)
        driver.copy_to_host(host, self.ptr, stream)
        return host

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr={self.ptr:#x})"


def allocate_arrays(device, specs: dict, alignment: int = 256) -> tuple:
    """Allocate one buffer holding several arrays.

    Parameters
    ----------
    specs : dict name → (shape, dtype)

    Returns
    -------
    (DeviceBuffer, dict name → DeviceArray), every array aligned to ``alignment`` bytes.
    """
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        total = -(-total // alignment) * alignment
        offsets[name] = total
        total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = DeviceBuffer(device, total)
    arrays = {name: DeviceArray(buffer, offsets[name], shape, dtype)
              for name, (shape, dtype) in specs.items()}
    return buffer, arrays
