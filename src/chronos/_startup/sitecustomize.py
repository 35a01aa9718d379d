"""Chronos soft caps for Python programs started by ``chronos run``.

This directory is put first on PYTHONPATH of the command, so Python imports
this file at start-up. It must work in any interpreter (even one without
Chronos installed), so it imports nothing of Chronos. It arranges that when
the program imports PyTorch or TensorFlow, that framework is told the
partition's memory cap (``CHRONOS_SOFT_LIMIT_BYTES``) before it first touches
the GPU, so allocations past the cap fail with the framework's own
out-of-memory error instead of the process being killed by the hard cap.
Then it hands over to any other ``sitecustomize`` further down the path (Debian's
and Ubuntu's system Python have one), which ours would otherwise shadow.

Typed for strict mypy, yet it must load under Python 3.8: annotations stay strings
(``from __future__ import annotations``), and names used only in annotations are
imported for the type checker alone, so a program's start-up imports nothing more.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at start-up; mypy reads this name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType


def _limits() -> list[tuple[int, int]]:
    """``(soft, total)`` bytes per visible GPU ordinal; empty: no limit set.

    ``CHRONOS_SOFT_LIMITS`` (``soft:total,...``, one per GPU of a group, in
    ``CUDA_VISIBLE_DEVICES`` order) first; else the one-GPU pair of variables.
    Without ``CHRONOS_SOFT_LIMIT_BYTES`` nothing is capped: unsetting it is how a
    program undoes the soft cap (the GPU suite does, to reach the library's cap).
    """
    listed = os.environ.get("CHRONOS_SOFT_LIMITS")
    if "CHRONOS_SOFT_LIMIT_BYTES" not in os.environ:
        return []
    try:
        if listed:
            pairs = [item.split(":") for item in listed.split(",")]
            limits = [(int(soft), int(total)) for soft, total in pairs]
        else:
            soft = int(os.environ["CHRONOS_SOFT_LIMIT_BYTES"])
            total = int(os.environ["CHRONOS_DEVICE_TOTAL_BYTES"])
            limits = [(soft, total)]
    except (KeyError, ValueError):
        return []
    return limits if all(soft > 0 and total > 0 for soft, total in limits) else []


def _limit() -> tuple[int, int] | None:
    """The primary GPU's ``(soft, total)``, or None without a limit."""
    limits = _limits()
    return limits[0] if limits else None


def _cap_torch(torch: ModuleType) -> None:
    limits = _limits()
    if not limits:
        return

    def apply() -> None:
        # Each GPU its own share: ordinal i is the group's i-th GPU.
        visible = torch.cuda.device_count()
        for ordinal, (soft, total) in enumerate(limits[:visible]):
            torch.cuda.set_per_process_memory_fraction(min(1.0, soft / total), ordinal)

    # Queued until CUDA initialises, so importing torch stays cheap and fork-safe.
    if torch.cuda.is_initialized():
        apply()
    else:
        torch.cuda._lazy_call(apply)


def _cap_tensorflow(tf: ModuleType) -> None:
    limits = _limits()
    if not limits:
        return
    try:
        gpus = tf.config.list_physical_devices("GPU")
        for gpu, (soft, _) in zip(gpus, limits):
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=soft // (1 << 20))]
            )
    except (RuntimeError, ValueError, AttributeError) as exc:
        sys.stderr.write(f"chronos: could not cap TensorFlow's GPU memory: {exc}\n")


_HOOKS: dict[str, Callable[[ModuleType], None]] = {
    "torch": _cap_torch,
    "tensorflow": _cap_tensorflow,
}


class _AfterImport:
    """A meta-path finder that runs a hook once a framework module has been imported."""

    def find_spec(
        self,
        name: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        hook = _HOOKS.get(name)
        if hook is None:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_cap(module: ModuleType) -> None:
            exec_module(module)
            del _HOOKS[name]
            try:
                hook(module)
            except Exception as exc:  # never break the user's import
                sys.stderr.write(f"chronos: could not cap {name}'s GPU memory: {exc}\n")

        setattr(loader, "exec_module", exec_and_cap)  # noqa: B010 - mypy refuses assigning a method
        return spec


def cap_imported(name: str, module: ModuleType) -> None:
    """Cap framework ``name`` (``torch``, ``tensorflow``), imported already, now.

    The door for ``chronos.frameworks.apply_in_process``, which loads this file by path.
    """
    _HOOKS[name](module)


def install() -> None:
    """Cap each framework when it is imported, if a limit is set (once per process)."""
    if _limit() is not None and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _chain() -> None:
    """Import the next sitecustomize on the path, which ours shadows."""
    here = os.path.dirname(os.path.abspath(__file__))
    # Both submodules by name: a bare interpreter (no .pth file, as Debian's python3)
    # has not imported importlib.util, and attribute access on importlib then fails.
    import importlib.machinery
    import importlib.util

    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    install()
    try:
        _chain()
    except Exception as exc:
        sys.stderr.write(f"chronos: the next sitecustomize failed: {exc}\n")
