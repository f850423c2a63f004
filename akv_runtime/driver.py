"""The CUDA driver layer: one error gate, the primary context, cubins, launches, memory.

Everything that talks to the CUDA driver goes through this module and every driver result
through :func:`check`, which turns a non-success ``CUresult`` into a :class:`CudaError`
carrying the code, its name and ``cuGetErrorString``'s explanation (the habit of cuda.core's
``handle_return`` and tinygrad's ``check``).

* The device's *primary* context is retained and made current, so buffers and streams are
  shared with PyTorch, CuPy and JAX in the same process.
* Module loading picks the cubin built for the device's compute capability from
  ``build/cubin/manifest.json`` (exact match, else the same major with the highest lower
  minor); otherwise :class:`NoCubinError` names the device's capability, the architectures
  built and the command that builds another (DESIGN.md section 6).
* Launches go to the stream the caller names; nothing here synchronises implicitly.

The bindings are those of NVIDIA's cuda-python (``cuda.bindings.driver``); tests replace
:data:`_cu` with a fake driver (``tests/fake_driver.py``) to run these paths without a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

try:  # cuda-python >= 12.6 / 13.x
    from cuda.bindings import driver as _cu
except ImportError as _exc:  # pragma: no cover - depends on the machine
    _cu = None
    _IMPORT_ERROR = str(_exc)
else:
    _IMPORT_ERROR = None

#: Where build.py writes the cubins and manifest (override with $AKV_CUBIN_DIR).
DEFAULT_CUBIN_DIR = Path(__file__).resolve().parent.parent / "build" / "cubin"
#: The kernel sources build.py compiles: a checkout's cuda/ (absent beside an installed wheel)
SOURCE_DIR = Path(__file__).resolve().parent.parent / "cuda"
BUILD_HINT = "python build.py --arch sm_{cc}"


class CudaError(RuntimeError):
    """A CUDA driver call failed.

    Attributes
    ----------
    code : int
        The ``CUresult`` value.
    name : str
        Its name, e.g. ``CUDA_ERROR_OUT_OF_MEMORY``.
    description : str
        ``cuGetErrorString``'s explanation.
    """

    def __init__(self, code: int, name: str, description: str, call: str = ""):
        self.code, self.name, self.description, self.call = code, name, description, call
        where = f" in {call}" if call else ""
        super().__init__(f"{name}: {description}{where}")


class NoCubinError(RuntimeError):
    """No cubin was built for the device's compute capability."""


class StaleCubinWarning(UserWarning):
    """The cubins were built from other kernel sources than the checkout's cuda/ holds now."""


def _decode(text) -> str:
    if isinstance(text, bytes):
        return text.decode(errors="replace")
    return str(text)


def check(result, call: str = ""):
    """The one gate for driver results.

    Parameters
    ----------
    result : tuple
        What a ``cuda.bindings.driver`` function returns: ``(CUresult, *values)``.
    call : str
        The call's name, for the message.

    Returns
    -------
    None, the single value, or a tuple of values.

    Raises
    ------
    CudaError
        When the ``CUresult`` is not ``CUDA_SUCCESS``.
    """
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    code = int(err)
    if code != 0:
        name, description = f"CUresult {code}", "unknown error"
        try:
            e, s = _cu.cuGetErrorName(err)
            if int(e) == 0:
                name = _decode(s)
            e, s = _cu.cuGetErrorString(err)
            if int(e) == 0:
                description = _decode(s)
        except Exception:  # noqa: BLE001 - naming the error must never mask it
            pass
        raise CudaError(code, name, description, call)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# ----------------------------------------------------------------------- availability

_lock = threading.Lock()
_init_state: dict = {}


def unavailable_reason() -> str | None:
    """Why CUDA cannot be used here (no cuda-python, no driver, no device), or None."""
    with _lock:
        if "reason" in _init_state:
            return _init_state["reason"]
        reason = None
        if _cu is None:
            reason = f"cuda-python is not importable ({_IMPORT_ERROR})"
        else:
            try:
                check(_cu.cuInit(0), "cuInit")
                if check(_cu.cuDeviceGetCount(), "cuDeviceGetCount") < 1:
                    reason = "the CUDA driver reports no device"
            except CudaError as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - e.g. libcuda.so missing
                reason = f"the CUDA driver could not be loaded ({exc})"
        _init_state["reason"] = reason
        return reason


def _reset_for_tests() -> None:
    """Forget the cached driver state (tests that swap :data:`_cu`)."""
    with _lock:
        _init_state.clear()
        _devices.clear()
        _modules.clear()
        _CLUSTER_ATTRIBUTES.clear()
        _LAUNCH_CONFIGS.clear()


# ----------------------------------------------------------------------------- device


@dataclass
class Device:
    """A CUDA device with its primary context current on this thread."""

    ordinal: int
    handle: object
    context: object
    compute_capability: tuple
    name: str
    multiprocessors: int

    def activate(self) -> None:
        """Make the primary context current on the calling thread."""
        check(_cu.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    @property
    def arch(self) -> str:
        return "sm_{}{}".format(*self.compute_capability)


_devices: dict = {}


def get_device(ordinal: int = 0) -> Device:
    """The device ``ordinal`` with its primary context retained and current.

    Raises
    ------
    RuntimeError
        When CUDA is unavailable (the reason is in the message).
    CudaError
        From any driver call.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"CUDA is unavailable: {reason}")
    with _lock:
        dev = _devices.get(ordinal)
        if dev is None:
            count = check(_cu.cuDeviceGetCount(), "cuDeviceGetCount")
            if not 0 <= ordinal < count:
                raise ValueError(f"device_id: {ordinal} is out of range [0, {count})")
            handle = check(_cu.cuDeviceGet(ordinal), "cuDeviceGet")
            attr = _cu.CUdevice_attribute
            major = check(_cu.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle), "cuDeviceGetAttribute")
            minor = check(_cu.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle), "cuDeviceGetAttribute")
            sms = check(_cu.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, handle), "cuDeviceGetAttribute")
            name = _decode(check(_cu.cuDeviceGetName(128, handle), "cuDeviceGetName"))
            name = name.split("\x00", 1)[0].strip()
            context = check(_cu.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain")
            dev = Device(ordinal, handle, context, (int(major), int(minor)), name, int(sms))
            _devices[ordinal] = dev
    dev.activate()
    return dev


# ----------------------------------------------------------------------------- cubins


def cubin_dir() -> Path:
    return Path(os.environ.get("AKV_CUBIN_DIR", DEFAULT_CUBIN_DIR))


def load_manifest(directory: Path | None = None) -> dict:
    """Read ``manifest.json`` written by build.py.

    Raises
    ------
    NoCubinError
        When the manifest is missing (nothing was built).
    """
    directory = cubin_dir() if directory is None else Path(directory)
    path = directory / "manifest.json"
    if not path.exists():
        raise NoCubinError(f"no cubins at {directory} (manifest.json missing): run "
                           f"`python build.py` first")
    return json.loads(path.read_text())


def _arch_cc(arch: str):
    digits = arch.removeprefix("sm_").rstrip("a")
    if not digits.isdigit() or len(digits) < 2:
        return None
    return int(digits[:-1]), int(digits[-1])


def select_arch(built_archs, compute_capability: tuple) -> str:
    """Pick the cubin architecture for a device.

    The exact ``sm_XY`` when built, else the same major with the highest lower minor (cubins
    run on later minors of one major); ``sm_XYa`` targets match only their exact capability.

    Raises
    ------
    NoCubinError
        Naming the device's capability, the architectures built and the build command.
    """
    major, minor = compute_capability
    exact = f"sm_{major}{minor}"
    for arch in (exact, exact + "a"):
        if arch in built_archs:
            return arch
    candidates = []
    for arch in built_archs:
        cc = _arch_cc(arch)
        if cc and not arch.endswith("a") and cc[0] == major and cc[1] <= minor:
            candidates.append((cc[1], arch))
    if candidates:
        return max(candidates)[1]
    built = ", ".join(sorted(built_archs)) or "none"
    raise NoCubinError(
        f"no cubin for this device (compute capability {major}.{minor}); built "
        f"architectures: {built}. Build one with `{BUILD_HINT.format(cc=f'{major}{minor}')}`")


def set_max_dynamic_shared(function, nbytes: int) -> None:
    """Allow ``function`` up to ``nbytes`` of dynamic shared memory (above the default 48 KB
    a kernel must opt in)."""
    attr = _cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(_cu.cuFuncSetAttribute(function, attr, int(nbytes)), "cuFuncSetAttribute")


def allow_non_portable_cluster(function) -> None:
    """Let ``function`` launch with clusters of more than 8 CTAs (up to 16 on sm_90; the
    driver refuses larger non-portable clusters unless the kernel opts in)."""
    attr = _cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
    check(_cu.cuFuncSetAttribute(function, attr, 1), "cuFuncSetAttribute")


def max_active_clusters(function, cluster: int, threads: int, shared_mem: int = 0) -> int:
    """Clusters of ``cluster`` CTAs (``threads`` each, ``shared_mem`` bytes of dynamic shared
    memory) of ``function`` that the device can run at once
    (``cuOccupancyMaxActiveClusters``); 0 when such a cluster does not fit at all. Raises
    CudaError."""
    config = _cu.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = int(cluster), 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = int(threads), 1, 1
    config.sharedMemBytes = int(shared_mem)
    config.attrs = [_cluster_attribute(int(cluster))]
    config.numAttrs = 1
    return int(check(_cu.cuOccupancyMaxActiveClusters(function, config),
                     "cuOccupancyMaxActiveClusters"))


def max_active_blocks(function, threads: int, shared_mem: int = 0) -> int:
    """CTAs of ``function`` (``threads`` per CTA, ``shared_mem`` bytes of dynamic shared
    memory) that fit on one multiprocessor at once (its registers, shared memory and warp
    slots; ``cuOccupancyMaxActiveBlocksPerMultiprocessor``). Raises CudaError."""
    return int(check(_cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        function, int(threads), int(shared_mem)), "cuOccupancyMaxActiveBlocksPerMultiprocessor"))


class Module:
    """A loaded cubin and its kernels."""

    def __init__(self, image: bytes, path: str = "<memory>"):
        self.path = path
        self._image = image  # the driver copies it, but keep it for the module's life
        self.handle = check(_cu.cuModuleLoadData(image), f"cuModuleLoadData({path})")
        self._functions: dict = {}

    def function(self, name: str):
        fn = self._functions.get(name)
        if fn is None:
            fn = check(_cu.cuModuleGetFunction(self.handle, name.encode()),
                       f"cuModuleGetFunction({name})")
            self._functions[name] = fn
        return fn


_modules: dict = {}


def stale_sources(manifest: dict, source_dir: Path | None = None) -> list[str]:
    """The kernel sources (``*.cu`` and ``*.cuh`` in ``source_dir``, default the checkout's
    cuda/, :data:`SOURCE_DIR`) whose sha256 is not the one build.py recorded in
    ``manifest["sources"]`` (changed, or new since the build), sorted by name. [] where the
    manifest records no sources or the directory does not exist (an installed package)."""
    recorded = manifest.get("sources")
    directory = SOURCE_DIR if source_dir is None else Path(source_dir)
    if not isinstance(recorded, dict) or not directory.is_dir():
        return []
    return [p.name for p in sorted(directory.iterdir())
            if p.suffix in (".cu", ".cuh") and
            recorded.get(p.name) != hashlib.sha256(p.read_bytes()).hexdigest()]


def load_module(device: Device, stem: str = "akv", directory: Path | None = None) -> Module:
    """Load ``<stem>.cubin`` for ``device``'s compute capability (cached per device).

    Warns (:class:`StaleCubinWarning`, naming the files and the build command) where the
    checkout's kernel sources differ from those the manifest records: a kernel added since
    the build would otherwise surface as CUDA_ERROR_NOT_FOUND from cuModuleGetFunction."""
    key = (device.ordinal, stem)
    mod = _modules.get(key)
    if mod is None:
        directory = cubin_dir() if directory is None else Path(directory)
        manifest = load_manifest(directory)
        stale = stale_sources(manifest)
        if stale:
            warnings.warn(f"the cubins in {directory} were built from other kernel sources "
                          f"than cuda/ holds now ({', '.join(stale)} changed or new): run "
                          f"`python build.py`", StaleCubinWarning, stacklevel=2)
        archs = {a for a, files in manifest.get("architectures", {}).items()
                 if f"{stem}.cubin" in files}
        arch = select_arch(archs, device.compute_capability)
        path = directory / arch / f"{stem}.cubin"
        if not path.exists():
            raise NoCubinError(f"{path} is listed in the manifest but missing: run "
                               f"`python build.py --arch {arch}`")
        mod = Module(path.read_bytes(), str(path))
        mod.arch = arch
        _modules[key] = mod
    return mod


# ----------------------------------------------------------------------------- launch


def ptr(address: int) -> ctypes.c_uint64:
    """A pointer kernel argument (8 bytes)."""
    return ctypes.c_uint64(int(address))


def i32(value: int) -> ctypes.c_int32:
    return ctypes.c_int32(int(value))


def f32(value: float) -> ctypes.c_float:
    return ctypes.c_float(float(value))


def pack_args(args) -> tuple:
    """Pack ctypes scalars into the ``void**`` array ``cuLaunchKernel`` takes.

    Returns ``(address, keepalive)``; ``keepalive`` must outlive the launch call.
    """
    for i, a in enumerate(args):
        if not isinstance(a, ctypes._SimpleCData):
            raise TypeError(f"kernel argument {i}: expected a ctypes scalar (driver.ptr/i32/"
                            f"f32), got {type(a).__name__}")
    array = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    return ctypes.addressof(array), (array, args)


def launch(function, grid, block, args, stream: int = 0, shared_mem: int = 0) -> None:
    """Launch ``function`` on ``stream`` (a ``CUstream`` handle as int; 0 = legacy default).

    No synchronisation: errors of the kernel itself surface at the caller's next
    synchronising call.
    """
    address, keep = pack_args(args)
    launch_packed(function, grid, block, address, stream, shared_mem)
    del keep


def launch_packed(function, grid, block, address: int, stream: int = 0,
                  shared_mem: int = 0, cluster: int = 0) -> None:
    """:func:`launch` with arguments already packed by :func:`pack_args` (the caller keeps
    them alive).

    ``cluster > 0`` launches thread-block clusters of ``cluster`` CTAs along x (compute
    capability 9.0 and later; ``cuLaunchKernelEx`` with
    ``CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION``); the grid's x must be a multiple of it."""
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]
    if not cluster:
        check(_cu.cuLaunchKernel(function, gx, gy, gz, bx, by, bz, shared_mem,
                                 _cu.CUstream(int(stream)), address, 0), "cuLaunchKernel")
        return
    # a decode step repeats the same launch: its config is built once (a host-side object;
    # the driver reads it during the call)
    key = (gx, gy, gz, bx, by, bz, int(shared_mem), int(stream), int(cluster))
    config = _LAUNCH_CONFIGS.get(key)
    if config is None:
        if len(_LAUNCH_CONFIGS) >= 256:
            _LAUNCH_CONFIGS.clear()
        config = _cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = gx, gy, gz
        config.blockDimX, config.blockDimY, config.blockDimZ = bx, by, bz
        config.sharedMemBytes = int(shared_mem)
        config.hStream = _cu.CUstream(int(stream))
        config.attrs = [_cluster_attribute(int(cluster))]
        config.numAttrs = 1
        _LAUNCH_CONFIGS[key] = config
    check(_cu.cuLaunchKernelEx(config, function, address, 0), "cuLaunchKernelEx")


_LAUNCH_CONFIGS: dict = {}


_CLUSTER_ATTRIBUTES: dict = {}


def _cluster_attribute(size: int):
    """The launch attribute for clusters of ``size`` x 1 x 1 CTAs (built once per size)."""
    attr = _CLUSTER_ATTRIBUTES.get(size)
    if attr is None:
        attr = _cu.CUlaunchAttribute()
        attr.id = _cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = size, 1, 1
        _CLUSTER_ATTRIBUTES[size] = attr
    return attr


# ----------------------------------------------------------------------------- memory


def mem_alloc(nbytes: int) -> int:
    """Allocate ``nbytes`` of device memory (cuMemAlloc) in the current context."""
    return int(check(_cu.cuMemAlloc(max(int(nbytes), 1)), "cuMemAlloc"))


def mem_free(address: int) -> None:
    check(_cu.cuMemFree(_cu.CUdeviceptr(int(address))), "cuMemFree")


def memset8(address: int, value: int, nbytes: int, stream: int = 0) -> None:
    check(_cu.cuMemsetD8Async(_cu.CUdeviceptr(int(address)), int(value), int(nbytes),
                              _cu.CUstream(int(stream))), "cuMemsetD8Async")


def copy_to_device(address: int, host_array) -> None:
    """Synchronous host → device copy (set-up only, never in the decode step)."""
    import numpy as np
    host = np.ascontiguousarray(host_array)
    check(_cu.cuMemcpyHtoD(_cu.CUdeviceptr(int(address)), host.ctypes.data, host.nbytes),
          "cuMemcpyHtoD")


def copy_to_host(host_array, address: int, stream: int = 0) -> None:
    """Device → host copy into a contiguous numpy array, after ``stream`` finished its work
    (debug read-backs and tests only)."""
    check(_cu.cuStreamSynchronize(_cu.CUstream(int(stream))), "cuStreamSynchronize")
    check(_cu.cuMemcpyDtoH(host_array.ctypes.data, _cu.CUdeviceptr(int(address)),
                           host_array.nbytes), "cuMemcpyDtoH")


def synchronize(stream: int = 0) -> None:
    check(_cu.cuStreamSynchronize(_cu.CUstream(int(stream))), "cuStreamSynchronize")
