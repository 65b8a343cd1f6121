"""llama.cpp's log callback, load progress and ggml's device registry, through ctypes.

Helpers of workers/llamacpp.py, which hands them the ``llama_cpp`` module:
this module never imports it, so that one engine module stays the only
importer of its library.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator


class LlamaLog:
    """llama.cpp's log, through a callback of ours instead of llama-cpp-python's.

    Levels are kept: debug lines (over a thousand for Gemma 3 at load) are
    dropped, and once the model is loaded only warnings and errors go on to
    stderr, where the daemon logs each line.  Facts the load prints and no
    API returns are kept: how many layers went to the GPU.
    """

    # ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
    # llama-cpp-python's own table predates DEBUG and shifts them all by one.
    LEVEL_DEBUG, LEVEL_WARN, LEVEL_ERROR, LEVEL_CONT = 1, 3, 4, 5
    OFFLOADED = re.compile(rb"offloaded (\d+)/(\d+) layers to GPU")
    # What ggml's CUDA/Vulkan/Metal backends print when a buffer does not fit.
    OUT_OF_MEMORY = re.compile(rb"out of memory|failed to allocate .*buffer|cudaMalloc failed", re.IGNORECASE)

    def __init__(self, llama_cpp: Any) -> None:
        self.quiet = False  # after loading: warnings and errors only
        self.offloaded: tuple[int, int] | None = None
        self.out_of_memory: str | None = None  # the first line of a load that said so
        self._last_level = 2
        self._callback = llama_cpp.llama_log_callback(self._on_log)  # kept referenced: C holds the pointer
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user_data: Any) -> None:
        level = self._last_level if level == self.LEVEL_CONT else level
        self._last_level = level
        if (found := self.OFFLOADED.search(text)) is not None:
            self.offloaded = (int(found.group(1)), int(found.group(2)))
        if self.out_of_memory is None and not self.quiet and self.OUT_OF_MEMORY.search(text):
            self.out_of_memory = text.decode("utf-8", "replace").strip()
        if level == self.LEVEL_DEBUG or (self.quiet and level not in (self.LEVEL_WARN, self.LEVEL_ERROR)):
            return
        try:
            sys.stderr.write(text.decode("utf-8", "replace"))
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - never raise into C
            pass




def backend_devices(lib_dir: Path) -> list[dict[str, Any]]:
    """The compute devices llama.cpp's backends see (name, description, kind, memory), for status.

    Read through ggml's device registry (libggml / libggml-base), which
    llama-cpp-python does not wrap; an empty list where the libraries cannot
    be read that way (another platform's names).
    """
    try:
        ggml, base = ctypes.CDLL(str(lib_dir / "libggml.so")), ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    except OSError:
        return []
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype, ggml.ggml_backend_dev_get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, name).restype, getattr(base, name).argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype, base.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    size = ctypes.c_size_t
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(size), ctypes.POINTER(size)]
    devices = []
    for index in range(ggml.ggml_backend_dev_count()):
        dev, free, total = ggml.ggml_backend_dev_get(index), size(0), size(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = {0: "cpu", 1: "gpu", 2: "accel"}.get(base.ggml_backend_dev_type(dev), "other")
        devices.append({"name": base.ggml_backend_dev_name(dev).decode(), "description": base.ggml_backend_dev_description(dev).decode(),
                        "type": kind, "free_bytes": free.value, "total_bytes": total.value})  # fmt: skip
    return devices


@contextlib.contextmanager
def load_progress(llama_cpp: Any, progress: Callable[[float, str], None]) -> Iterator[None]:
    """Report llama.cpp's load progress, which the Llama constructor does not expose.

    Llama() builds its model parameters from ``llama_model_default_params()``;
    wrapping that function for the duration of the load lets llama.cpp call
    our progress callback.  The callback object must outlive the load.
    """
    original = llama_cpp.llama_cpp.llama_model_default_params
    last = [-1.0]

    @llama_cpp.llama_progress_callback
    def on_progress(fraction: float, _user_data: Any) -> bool:
        if fraction - last[0] >= 0.1 or fraction >= 1.0:
            last[0] = fraction
            progress(float(fraction), "loading tensors")
        return True

    def params_with_progress() -> Any:
        params = original()
        params.progress_callback = on_progress
        return params

    llama_cpp.llama_cpp.llama_model_default_params = params_with_progress
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original
        sys.stderr.flush()
