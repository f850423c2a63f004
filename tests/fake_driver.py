"""A fake CUDA driver (the ``cuda.bindings.driver`` calls the runtime makes), after tinygrad's
mockgpu: device memory is host memory, kernels do not run but every launch is recorded with
its parameters decoded from the ``void**`` array through the kernel signatures parsed from
``cuda/akv.cu``. GPU code paths (device query, cubin selection, buffer set-up, argument
packing, launch geometry) run in CPU-only CI."""

from __future__ import annotations

import ctypes
import enum
import re
import types
from pathlib import Path

CUDA_ROOT = Path(__file__).resolve().parent.parent / "cuda"


def _macro_args(text: str, at: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the macro call whose '(' is at ``text[at]`` (commas
    inside nested parentheses belong to an argument) and the index just past its ')'."""
    args, depth, cur = [], 0, []
    for i in range(at + 1, len(text)):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                args.append("".join(cur).strip())
                return args, i + 1
            depth -= 1
        if ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    raise ValueError(f"unbalanced macro call at {text[at - 20:at + 20]!r}")


def _expand(text: str, macros: dict, depth: int = 0) -> str:
    """``text`` with every call of a function-like macro in ``macros`` replaced by its body
    (parameters substituted, ``##`` pasted, ``__VA_ARGS__`` for ``...``), recursively."""
    if depth > 8:
        raise ValueError("macro expansion too deep")
    names = "|".join(map(re.escape, macros))
    if not names:
        return text
    out, pos = [], 0
    for m in re.finditer(rf"\b({names})\(", text):
        if m.start() < pos:
            continue
        params, body = macros[m.group(1)]
        args, end = _macro_args(text, m.end() - 1)
        named = [p for p in params if p != "..."]
        values = dict(zip(named, args))
        if "..." in params:
            values["__VA_ARGS__"] = ", ".join(args[len(named):])
        if values:   # every parameter in one pass: an argument is never substituted again
            alternation = "|".join(map(re.escape, values))
            body = re.sub(rf"(?:##)?\b({alternation})\b(?:##)?",
                          lambda found: values[found.group(1)], body)
        out.append(text[pos:m.start()])
        out.append(_expand(body.replace("##", ""), macros, depth + 1))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def parse_kernel_signatures(source: str) -> dict:
    """Map each ``extern "C" __global__`` kernel of the source (macro-instantiated ones
    included, through nested and variadic macros) to its parameter kinds: 'ptr' (8 bytes),
    'i64', 'i32' or 'f32'."""
    text = source.replace("\\\n", "\n")
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)   # comments name no kernels
    macros = {}
    define = re.compile(r"#define\s+(\w+)\(([\w\s,.]*)\)(.*?)(?=\n\w|\n#|\n//|\Z)", re.S)
    for m in define.finditer(text):
        macros[m.group(1)] = ([p.strip() for p in m.group(2).split(",")], m.group(3))
    expanded = _expand(define.sub("", text), macros)
    sigs = {}
    found = re.findall(r'extern "C" __global__', expanded)
    for head in re.finditer(r'extern "C" __global__ void', expanded):
        rest = expanded[head.end():]
        bounds = re.match(r"\s+__launch_bounds__\(", rest)
        # skip the launch bounds' parentheses, however nested
        pos = _macro_args(rest, bounds.end() - 1)[1] if bounds else 0
        m = re.match(r"\s+(akv_\w+)\((.*?)\)\s*\{", rest[pos:], re.S)
        if m is None:
            continue
        kinds = []
        for p in m.group(2).split(","):
            p = " ".join(p.split())
            if "*" in p:
                kinds.append("ptr")
            elif p.startswith("long long"):
                kinds.append("i64")
            elif p.startswith("int"):
                kinds.append("i32")
            elif p.startswith("float"):
                kinds.append("f32")
            else:
                raise ValueError(f"unparsed parameter {p!r} of {m.group(1)}")
        sigs[m.group(1)] = kinds
    if len(found) != len(sigs):
        raise ValueError(f"{len(found)} kernel entry points in the sources, {len(sigs)} parsed")
    return sigs


def cuda_sources() -> str:
    """All of cuda/: headers first (they define the entry-point macros), then .cu files."""
    files = sorted(CUDA_ROOT.glob("*.cuh")) + sorted(CUDA_ROOT.glob("*.cu"))
    return "\n".join(f.read_text() for f in files)


_CTYPES = {"ptr": ctypes.c_uint64, "i64": ctypes.c_int64, "i32": ctypes.c_int32,
           "f32": ctypes.c_float}


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_NOT_FOUND = 500


_DESCRIPTIONS = {
    CUresult.CUDA_ERROR_INVALID_VALUE: "invalid argument",
    CUresult.CUDA_ERROR_OUT_OF_MEMORY: "out of memory",
    CUresult.CUDA_ERROR_NO_DEVICE: "no CUDA-capable device is detected",
    CUresult.CUDA_ERROR_NOT_FOUND: "named symbol not found",
}


class CUdevice_attribute(enum.IntEnum):
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class CUfunction_attribute(enum.IntEnum):
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
    CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14


class CUlaunchAttributeID(enum.IntEnum):
    CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4


class CUlaunchAttribute:
    def __init__(self):
        self.id = None
        self.value = types.SimpleNamespace(clusterDim=types.SimpleNamespace(x=0, y=0, z=0))


class CUlaunchConfig:
    def __init__(self):
        self.attrs, self.numAttrs = [], 0


class _Handle(int):
    pass


def CUstream(value=0):
    return _Handle(int(value))


def CUdeviceptr(value=0):
    return _Handle(int(value))


class FakeDriver:
    """Install with ``monkeypatch.setattr(akv_runtime.driver, "_cu", FakeDriver(...))``."""

    CUresult = CUresult
    CUdevice_attribute = CUdevice_attribute
    CUfunction_attribute = CUfunction_attribute
    CUlaunchAttributeID = CUlaunchAttributeID
    CUlaunchAttribute = CUlaunchAttribute
    CUlaunchConfig = CUlaunchConfig
    CUstream = staticmethod(CUstream)
    CUdeviceptr = staticmethod(CUdeviceptr)

    def __init__(self, compute_capability=(9, 0), devices=1, fail=None, occupancy=None,
                 clusters=None):
        self.cc = compute_capability
        self.clusters = dict(clusters or {})
        self.occupancy = dict(occupancy or {})   # kernel name -> resident CTAs (default 8)
        self.devices = devices
        self.fail = dict(fail or {})       # call name -> CUresult to return
        self.launches = []
        self.allocations = {}
        self.loaded_images = []
        self.function_attributes = {}
        self.signatures = parse_kernel_signatures(cuda_sources())

    def _result(self, name, *values):
        if name in self.fail:
            return (self.fail[name],) + tuple(None for _ in values)
        return (CUresult.CUDA_SUCCESS,) + values

    # errors
    def cuGetErrorName(self, err):
        return CUresult.CUDA_SUCCESS, CUresult(int(err)).name.encode()

    def cuGetErrorString(self, err):
        return CUresult.CUDA_SUCCESS, _DESCRIPTIONS.get(CUresult(int(err)), "?").encode()

    # device and context
    def cuInit(self, flags):
        return self._result("cuInit")

    def cuDeviceGetCount(self):
        return self._result("cuDeviceGetCount", self.devices)

    def cuDeviceGet(self, ordinal):
        return self._result("cuDeviceGet", _Handle(ordinal))

    def cuDeviceGetAttribute(self, attr, dev):
        value = {CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: self.cc[0],
                 CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: self.cc[1],
                 CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: 132}[attr]
        return self._result("cuDeviceGetAttribute", value)

    def cuDeviceGetName(self, length, dev):
        return self._result("cuDeviceGetName", b"Fake GPU\x00\x00")

    def cuDevicePrimaryCtxRetain(self, dev):
        return self._result("cuDevicePrimaryCtxRetain", _Handle(0xC0))

    def cuCtxSetCurrent(self, ctx):
        return self._result("cuCtxSetCurrent")

    # modules
    def cuModuleLoadData(self, image):
        self.loaded_images.append(bytes(image))
        return self._result("cuModuleLoadData", _Handle(len(self.loaded_images)))

    def cuModuleGetFunction(self, module, name):
        name = name.decode()
        if name not in self.signatures:
            return (CUresult.CUDA_ERROR_NOT_FOUND, None)
        return self._result("cuModuleGetFunction", name)

    def cuFuncSetAttribute(self, fn, attr, value):
        self.function_attributes[(fn, CUfunction_attribute(attr).name)] = value
        return self._result("cuFuncSetAttribute")

    def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, fn, threads, smem):
        return self._result("cuOccupancyMaxActiveBlocksPerMultiprocessor",
                            self.occupancy.get(fn, 8))

    def cuOccupancyMaxActiveClusters(self, fn, config):
        """``clusters`` (constructor): cluster size -> clusters that fit (default 7 of 16
        CTAs, 15 of 8, as the H200 reported for the fused kernel)."""
        size = config.attrs[0].value.clusterDim.x if config.numAttrs else 1
        return self._result("cuOccupancyMaxActiveClusters",
                            self.clusters.get(size, {8: 15, 16: 7}.get(size, 0)))

    def cuLaunchKernelEx(self, config, fn, params, extra):
        """Recorded as cuLaunchKernel's launches, with the cluster size (CTAs along x) the
        attributes ask for; the real driver's checks that the fake repeats: the grid's x a
        multiple of the cluster, more than 8 CTAs only after the kernel opted in."""
        cluster = 0
        for attr in config.attrs[:config.numAttrs]:
            if attr.id == CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION:
                dim = attr.value.clusterDim
                if (dim.y, dim.z) != (1, 1):
                    return (CUresult.CUDA_ERROR_INVALID_VALUE,)
                cluster = dim.x
        opted = self.function_attributes.get(
            (fn, "CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED"), 0)
        if cluster and (config.gridDimX % cluster or (cluster > 8 and not opted)):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        result = self.cuLaunchKernel(fn, config.gridDimX, config.gridDimY, config.gridDimZ,
                                     config.blockDimX, config.blockDimY, config.blockDimZ,
                                     config.sharedMemBytes, config.hStream, params, extra)
        if result[0] == CUresult.CUDA_SUCCESS:
            self.launches[-1]["cluster"] = cluster
        return result

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        kinds = self.signatures[fn]
        limit = self.function_attributes.get(
            (fn, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES"), 48 << 10)
        if smem > limit:  # the real driver refuses this launch too
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        slots = (ctypes.c_void_p * len(kinds)).from_address(params)
        values = [_CTYPES[k].from_address(slots[i]).value for i, k in enumerate(kinds)]
        self.launches.append({"name": fn, "grid": (gx, gy, gz), "block": (bx, by, bz),
                              "stream": int(stream), "args": values, "smem": smem})
        return self._result("cuLaunchKernel")

    # memory: host memory stands in for device memory
    def cuMemAlloc(self, nbytes):
        if "cuMemAlloc" in self.fail:
            return (self.fail["cuMemAlloc"], None)
        buf = ctypes.create_string_buffer(int(nbytes))
        address = ctypes.addressof(buf)
        self.allocations[address] = buf
        return CUresult.CUDA_SUCCESS, address

    def cuMemFree(self, ptr):
        self.allocations.pop(int(ptr), None)
        return self._result("cuMemFree")

    def cuMemsetD8Async(self, ptr, value, n, stream):
        ctypes.memset(int(ptr), value, n)
        return self._result("cuMemsetD8Async")

    def cuMemcpyHtoD(self, dst, src, n):
        ctypes.memmove(int(dst), int(src), n)
        return self._result("cuMemcpyHtoD")

    def cuMemcpyDtoH(self, dst, src, n):
        ctypes.memmove(int(dst), int(src), n)
        return self._result("cuMemcpyDtoH")

    def cuStreamSynchronize(self, stream):
        return self._result("cuStreamSynchronize")
