"""What the runtime needs to know about a caller's array, without importing torch.

torch tensors are read through their own attributes (no copy, no DLPack round trip on the
hot path); any other object that speaks DLPack or the CUDA Array Interface (CuPy, JAX) is
read through cuda.core's :class:`StridedMemoryView`; numpy arrays directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TORCH_DTYPES = {
    "torch.float16": np.dtype(np.float16), "torch.float32": np.dtype(np.float32),
    "torch.float64": np.dtype(np.float64), "torch.bfloat16": None,
    "torch.int32": np.dtype(np.int32), "torch.int64": np.dtype(np.int64),
    "torch.uint8": np.dtype(np.uint8),
}


@dataclass(frozen=True)
class ArrayInfo:
    """Shape, element strides, dtype, device and address of a caller's array.

    ``device`` is ``"cpu"`` or ``"cuda"``; ``ptr`` is the device address for CUDA arrays
    (0 for host arrays); ``dtype`` is None for a dtype numpy does not have (bfloat16).
    """

    shape: tuple
    strides: tuple
    dtype: np.dtype | None
    dtype_name: str
    device: str
    device_id: int
    ptr: int
    obj: object

    @property
    def is_torch(self) -> bool:
        return type(self.obj).__module__.startswith("torch")


def is_torch_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def _c_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= int(n)
    return tuple(reversed(strides))


def describe(x, name: str) -> ArrayInfo:
    """Describe array ``x`` (argument ``name``, used in error messages).

    Raises
    ------
    TypeError
        If ``x`` is not a numpy array, a torch tensor or a DLPack / CUDA Array Interface
        object; or is a numpy masked array (its mask would be ignored) or a torch tensor
        that is not strided (sparse, ...).
    """
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a numpy masked array (its mask "
                        f"would be ignored)")
    if isinstance(x, np.ndarray):
        strides = tuple(s // x.itemsize for s in x.strides)
        return ArrayInfo(tuple(x.shape), strides, x.dtype, str(x.dtype), "cpu", -1, 0, x)
    if is_torch_tensor(x):
        if str(getattr(x, "layout", "torch.strided")) != "torch.strided":
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout "
                            f"{str(x.layout).replace('torch.', '')}")
        dev = x.device
        dtype_name = str(x.dtype)
        return ArrayInfo(tuple(x.shape), tuple(x.stride()), _TORCH_DTYPES.get(dtype_name),
                         dtype_name.replace("torch.", ""), dev.type,
                         dev.index if dev.index is not None else (0 if dev.type == "cuda" else -1),
                         x.data_ptr() if dev.type == "cuda" else 0, x)
    if hasattr(x, "__dlpack__") or hasattr(x, "__cuda_array_interface__"):
        try:
            from cuda.core.utils import StridedMemoryView
        except ImportError as exc:  # pragma: no cover - cuda-core is a dependency
            raise TypeError(f"{name}: reading a DLPack array needs cuda-core ({exc})") from exc
        view = StridedMemoryView(x, stream_ptr=-1)
        shape = tuple(view.shape)
        strides = tuple(view.strides) if view.strides is not None else _c_strides(shape)
        device = "cuda" if view.is_device_accessible and view.device_id >= 0 else "cpu"
        return ArrayInfo(shape, strides, np.dtype(view.dtype), str(view.dtype), device,
                         view.device_id, int(view.ptr) if device == "cuda" else 0, x)
    raise TypeError(f"{name}: expected a numpy array, a torch tensor or a DLPack array, "
                    f"got {type(x).__name__}")


def to_numpy(x) -> np.ndarray:
    """A host numpy view of ``x`` (torch CPU tensors, numpy arrays and host DLPack
    objects; no copy)."""
    if is_torch_tensor(x):
        return x.detach().numpy()
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    return np.asarray(x)


def json_default(x):
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays as plain JSON
    values (the result files of run and eval); anything else raises ``TypeError``."""
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
