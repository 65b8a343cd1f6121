"""llama.cpp's log, through a callback of ours, at levels an operator can live with.

A helper of workers/llamacpp/engine.py, which hands it the ``llama_cpp`` module: this
module never imports it.  Every line goes to the worker's ``logging`` (logger
``llama.cpp``), whose one-line format the daemon reads back with its level
(``DEBUG llama.cpp: text``).  llama.cpp prints about 150 lines at INFO on every
load: a dump of the model's metadata, its hyper-parameters, vocabulary and
scheduler details.  Those go to debug; what stays at info is what was loaded
(file, type, size, parameters), where (devices, offloaded layers), how much
memory it took (every buffer size), the context, and every warning and error.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import re
import threading
from typing import Any, Iterator

log = logging.getLogger("llama.cpp")
python_log = logging.getLogger("llama_cpp")  # llama-cpp-python's own prints while loading

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
# llama-cpp-python's own table predates DEBUG and shifts them all by one.
LEVEL_DEBUG, LEVEL_INFO, LEVEL_WARN, LEVEL_ERROR, LEVEL_CONT = 1, 2, 3, 4, 5
_LOGGING_LEVELS = {
    LEVEL_DEBUG: logging.DEBUG,
    LEVEL_INFO: logging.INFO,
    LEVEL_WARN: logging.WARNING,
    LEVEL_ERROR: logging.ERROR,
}

# INFO lines of these families are detail (the metadata dump, print_info's
# hyper-parameters, the vocabulary, KV cache and scheduler internals) ...
DETAIL = re.compile(
    r"^(llama_model_loader: (- |Dumping)|print_info: |load: |llama_context: |llama_kv_cache(_iswa)?: |sched_reserve: |graph_reserve: |resolve_fused_ops: )"
)
# ... unless they are one of the summary lines an operator reads at info.
SUMMARY = re.compile(
    r"buffer size|offload"
    r"|^print_info: (file type|file size|arch|model type|model params|general\.name|n_ctx_train|n_layer) +="
    r"|^llama_context: (n_ctx|n_batch|n_ubatch|flash_attn) +=|^llama_context: n_ctx_seq \("
    r"|^llama_kv_cache: size ="
)
PROGRESS_DOTS = re.compile(r"^\.+")  # llama.cpp's default load progress, when no callback replaces it


def logging_level(ggml_level: int, line: str) -> int:
    """The level a complete line of llama.cpp's log is logged at."""
    level = _LOGGING_LEVELS.get(ggml_level, logging.INFO)
    if level == logging.INFO and DETAIL.match(line) and not SUMMARY.search(line):
        return logging.DEBUG
    return level


class LlamaLog:
    """llama.cpp's log, through a callback of ours instead of llama-cpp-python's.

    Fragments are joined into lines (llama.cpp continues lines with CONT);
    once the model is loaded only warnings and errors are logged.  Facts the
    load prints and no API returns are kept: how many layers went to the GPU,
    whether flash attention is on, and whether a buffer did not fit.
    """

    OFFLOADED = re.compile(rb"offloaded (\d+)/(\d+) layers to GPU")
    # The context's setting ("flash_attn = auto"), then, for auto, what llama.cpp
    # resolved it to ("Flash Attention enabled" / "Flash Attention not supported, set to disabled").
    FLASH_ATTN = re.compile(rb"flash_attn\s+= (enabled|disabled)|Flash Attention (enabled|not supported)")
    # What ggml's CUDA/Vulkan/Metal backends print when a buffer does not fit.
    OUT_OF_MEMORY = re.compile(rb"out of memory|failed to allocate .*buffer|cudaMalloc failed", re.IGNORECASE)

    def __init__(self, llama_cpp: Any) -> None:
        self.quiet = False  # after loading: warnings and errors only
        self.offloaded: tuple[int, int] | None = None
        self.flash_attn: bool | None = None  # as the context was created; None: not said
        self.out_of_memory: str | None = None  # the first line of a load that said so
        self._level = LEVEL_INFO
        self._partial = ""  # a line llama.cpp has not finished yet
        self._lock = threading.Lock()
        self._callback = llama_cpp.llama_log_callback(self._on_log)  # kept referenced: C holds the pointer
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user_data: Any) -> None:
        try:
            if (found := self.OFFLOADED.search(text)) is not None:
                self.offloaded = (int(found.group(1)), int(found.group(2)))
            if (found := self.FLASH_ATTN.search(text)) is not None:
                self.flash_attn = (found.group(1) or found.group(2)) == b"enabled"
            if self.out_of_memory is None and not self.quiet and self.OUT_OF_MEMORY.search(text):
                self.out_of_memory = text.decode("utf-8", "replace").strip()
            with self._lock:
                if level != LEVEL_CONT:
                    self._emit_partial()
                    self._level = level
                *lines, self._partial = (self._partial + text.decode("utf-8", "replace")).split("\n")
                for line in lines:
                    self._emit(line)
        except Exception:  # noqa: BLE001 - never raise into C
            pass

    def flush(self) -> None:
        """Log what is left of an unfinished line (at the end of a load)."""
        with self._lock:
            self._emit_partial()

    def _emit_partial(self) -> None:
        partial, self._partial = self._partial, ""
        if partial:
            self._emit(partial)

    def _emit(self, line: str) -> None:
        line = PROGRESS_DOTS.sub("", line).rstrip()
        level = logging_level(self._level, line)
        if line and not (self.quiet and level < logging.WARNING):
            log.log(level, "%s", line)


@contextlib.contextmanager
def python_prints() -> Iterator[None]:
    """llama-cpp-python prints to sys.stderr while loading (system info, the metadata
    again, chat template guesses the worker does not use): log those lines at debug,
    any that say something failed as a warning."""
    sink = _LineSink()
    try:
        with contextlib.redirect_stderr(sink):
            yield
    finally:
        sink.close()


class _LineSink(io.TextIOBase):
    """A text stream that logs every complete line it is given."""

    def __init__(self) -> None:
        super().__init__()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._log(line)
        return len(text)

    def close(self) -> None:
        if self._partial:
            self._log(self._partial)
            self._partial = ""
        super().close()

    @staticmethod
    def _log(line: str) -> None:
        if line.strip():
            failed = re.search(r"\b(fail|error)", line, re.IGNORECASE) is not None
            python_log.log(logging.WARNING if failed else logging.DEBUG, "%s", line.rstrip())
