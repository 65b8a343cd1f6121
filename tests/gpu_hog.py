"""Hold GPU memory through the CUDA driver's own API (libcuda, ctypes: no framework needed).

    python gpu_hog.py DEVICE LEAVE_BYTES      (LEAVE_BYTES -1: hold only the CUDA context)

Makes the device's primary context current, then allocates (plain device
memory, cuMemAlloc) until LEAVE_BYTES are free; prints one JSON line (its
pid, the free and held bytes) and holds everything until stdin closes.
Run by tests/cuda_llama.py's GpuHog.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

CHUNK = 1 << 30
ALIGN = 2 << 20


def main() -> int:
    device, leave = int(sys.argv[1]), int(sys.argv[2])
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(code: int, what: str) -> None:
        if code != 0:
            raise SystemExit(f"{what} failed: CUresult {code}")

    check(cuda.cuInit(0), "cuInit")
    handle = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
    context = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    free, total = ctypes.c_size_t(), ctypes.c_size_t()

    def free_now() -> int:
        check(cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        return free.value

    held, pointers, chunk = 0, [], CHUNK
    while leave >= 0 and free_now() - leave >= ALIGN:
        size = min(chunk, (free.value - leave) // ALIGN * ALIGN)
        pointer = ctypes.c_uint64()
        if cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(size)) != 0:
            if size <= ALIGN:
                break
            chunk = max(ALIGN, size // 2)  # fragmented or reserved: smaller chunks from here
            continue
        pointers.append(pointer)
        held += size
    print(json.dumps({"pid": os.getpid(), "free_bytes": free_now(), "held_bytes": held}), flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
