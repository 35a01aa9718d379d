"""The one door through which Chronos talks to NVML.

``pynvml`` (from the ``nvidia-ml-py`` package) is imported on first use, not
when this module is imported, so commands that never touch a GPU start fast.
``nvmlInit`` runs once, lazily and under a lock; ``close`` shuts NVML down.

Every query goes through :meth:`Nvml.call`, which never raises for a query
the GPU or driver cannot answer: it returns an :class:`Unavailable` value
instead (function missing from this pynvml or driver, not supported, no
permission, GPU lost …). Only a missing library or driver is an error, raised
as :class:`~chronos.errors.DeviceError` when NVML is first needed.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from chronos.errors import DeviceError

# NVML return codes (nvml.h); pynvml exposes the same values as NVML_ERROR_*.
NOT_FOUND = 6
DRIVER_NOT_LOADED = 9
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13

#: NVML's "value not available" for unsigned 64-bit fields.
VALUE_NOT_AVAILABLE_U64 = 2**64 - 1

_DRIVER_MISSING = (DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND)


@dataclass(frozen=True)
class Unavailable:
    """The answer of a query NVML could not give; false in a boolean context."""

    reason: str
    code: int | None = None

    def __bool__(self) -> bool:
        return False


_default_library: Any = None


def set_library(module: Any) -> None:
    """Use ``module`` instead of ``pynvml`` for every :class:`Nvml` made later.

    For tests: pass an object with pynvml's names. ``None`` restores pynvml.
    """
    global _default_library
    _default_library = module


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as exc:
        raise DeviceError(
            "NVIDIA driver not found: the Python NVML bindings (nvidia-ml-py) "
            f"are not installed ({exc})"
        ) from None
    module: ModuleType = pynvml
    return module


def is_not_available_value(value: object) -> bool:
    """True for NVML's "not available" marker (``None`` or 2**64-1)."""
    return value is None or value == VALUE_NOT_AVAILABLE_U64


def text(value: object) -> str | None:
    """A string from NVML (older pynvml returns bytes); None if unavailable."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, str):
        return value
    return None


class Nvml:
    """A lazily initialised NVML session. Thread-safe."""

    def __init__(self, library: Any = None) -> None:
        self._library = library if library is not None else _default_library
        self._lib: Any = None
        self._lock = threading.Lock()

    @property
    def lib(self) -> Any:
        """The initialised pynvml module; raises DeviceError if NVML is missing."""
        lib = self._lib
        if lib is not None:
            return lib
        with self._lock:
            if self._lib is None:
                self._lib = self._start()
            return self._lib

    def _start(self) -> Any:
        lib = self._library if self._library is not None else _import_pynvml()
        try:
            lib.nvmlInit()
        except Exception as exc:
            raise _init_error(exc) from None
        return lib

    def constant(self, name: str) -> Any:
        return getattr(self.lib, name, None)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``pynvml.<name>(*args)``, or an :class:`Unavailable` saying why not."""
        lib = self.lib
        function = getattr(lib, name, None)
        if function is None:
            return Unavailable(f"{name} is not in this pynvml", FUNCTION_NOT_FOUND)
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            nvml_error = getattr(lib, "NVMLError", None)
            if isinstance(nvml_error, type) and isinstance(exc, nvml_error):
                return Unavailable(f"{name}: {_describe(exc)}", getattr(exc, "value", None))
            if type(exc).__name__ == "NVMLLibraryMismatchError":
                # pynvml's unversioned wrappers raise this when the driver lacks the
                # function version they call.
                return Unavailable(f"{name}: {exc}", FUNCTION_NOT_FOUND)
            raise

    def value(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call`, with ``None`` for anything unavailable."""
        result = self.call(name, *args, **kwargs)
        return None if isinstance(result, Unavailable) else result

    def close(self) -> None:
        with self._lock:
            lib, self._lib = self._lib, None
        if lib is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing to recover
                lib.nvmlShutdown()


def _describe(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # pynvml's __str__ itself calls into NVML
        return type(exc).__name__


def _init_error(exc: Exception) -> DeviceError:
    code = getattr(exc, "value", None)
    if code in _DRIVER_MISSING or isinstance(exc, OSError):
        return DeviceError(f"NVIDIA driver not found: {_describe(exc)}")
    return DeviceError(f"NVML could not start: {_describe(exc)}")
