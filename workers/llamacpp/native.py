"""llama.cpp's load progress and ggml's device registry, through ctypes.

Helpers of workers/llamacpp/engine.py, which hands them the ``llama_cpp`` module:
this module never imports it, so that one engine module stays the only
importer of its library.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path
from typing import Any, Callable, Iterator


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
        devices.append(
            {
                "name": base.ggml_backend_dev_name(dev).decode(),
                "description": base.ggml_backend_dev_description(dev).decode(),
                "type": kind,
                "free_bytes": free.value,
                "total_bytes": total.value,
            }
        )
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


@contextlib.contextmanager
def context_params(llama_cpp: Any, **fields: Any) -> Iterator[None]:
    """Create the load's context with these ``llama_context_params`` fields.

    Llama() has no argument for some of them: llama.cpp's "auto" flash
    attention (it turns it on only where the device running the layers
    supports it; Llama() knows on and off), or several sequences in one
    context (``n_seq_max``, for ``parallel``).  A callable value is called
    with the loaded model (what the model's own metadata says, e.g. pooling).  They are set on the parameters'
    way to ``llama_init_from_model``, which llama-cpp-python calls through the
    module attribute wrapped here for the duration of the load.
    """
    original = llama_cpp.llama_cpp.llama_init_from_model

    def init_with(model: Any, params: Any) -> Any:
        for name, value in fields.items():  # a callable: the value is the model's own (read from the model)
            setattr(params, name, value(model) if callable(value) else value)
        return original(model, params)

    llama_cpp.llama_cpp.llama_init_from_model = init_with
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_init_from_model = original
