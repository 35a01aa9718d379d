"""Chronos soft caps for Python programs started by ``chronos run``.

This directory is put first on PYTHONPATH of the command, so Python imports
this file at start-up. It must work in any interpreter (even one without
Chronos installed), so it imports nothing of Chronos. It arranges that when
the program imports PyTorch or TensorFlow, that framework is told the
partition's memory cap (``CHRONOS_SOFT_LIMIT_BYTES``) before it first touches
the GPU, so allocations past the cap fail with the framework's own
out-of-memory error instead of the process being killed by the hard cap.
Then it hands over to any other ``sitecustomize`` further down the path.
"""

import os
import sys


def _limit():
    try:
        soft = int(os.environ["CHRONOS_SOFT_LIMIT_BYTES"])
        total = int(os.environ["CHRONOS_DEVICE_TOTAL_BYTES"])
    except (KeyError, ValueError):
        return None
    if soft <= 0 or total <= 0:
        return None
    return soft, total


def _cap_torch(torch):
    soft, total = _limit()
    fraction = min(1.0, soft / total)

    def apply():
        torch.cuda.set_per_process_memory_fraction(fraction, 0)

    # Queued until CUDA initialises, so importing torch stays cheap and fork-safe.
    if torch.cuda.is_initialized():
        apply()
    else:
        torch.cuda._lazy_call(apply)


def _cap_tensorflow(tf):
    soft, _ = _limit()
    try:
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            tf.config.set_logical_device_configuration(
                gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=soft // (1 << 20))]
            )
    except (RuntimeError, ValueError, AttributeError) as exc:
        sys.stderr.write(f"chronos: could not cap TensorFlow's GPU memory: {exc}\n")


_HOOKS = {"torch": _cap_torch, "tensorflow": _cap_tensorflow}


class _AfterImport:
    """A meta-path finder that runs a hook once a framework module has been imported."""

    def find_spec(self, name, path=None, target=None):
        hook = _HOOKS.get(name)
        if hook is None:
            return None
        import importlib.machinery
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

        def exec_and_cap(module):
            exec_module(module)
            del _HOOKS[name]
            try:
                hook(module)
            except Exception as exc:  # never break the user's import
                sys.stderr.write(f"chronos: could not cap {name}'s GPU memory: {exc}\n")

        loader.exec_module = exec_and_cap
        return spec


def _install():
    if _limit() is not None and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _chain():
    """Import the next sitecustomize on the path, which ours shadows."""
    here = os.path.dirname(os.path.abspath(__file__))
    import importlib.machinery
    import importlib.util

    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    _install()
    try:
        _chain()
    except Exception as exc:
        sys.stderr.write(f"chronos: the next sitecustomize failed: {exc}\n")
