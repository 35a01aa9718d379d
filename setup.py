"""Builds the allocation-time cap library (src/chronos/native/chronos_cap.c) at install.

Everything else about the package is in pyproject.toml. The library is a plain
shared object for LD_PRELOAD, not a Python module, so it keeps a fixed name and
exports no PyInit_ symbol. It is optional: without a C compiler the install
still succeeds and Chronos falls back to the sampling hard cap alone (it says so
once, see chronos.alloccap).
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CAP_MODULE = "chronos.native.libchronos_cap"


class BuildCapLibrary(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # Called with the dotted name or (by get_ext_fullpath) with its last part only.
        if fullname in (CAP_MODULE, CAP_MODULE.rsplit(".", 1)[1]):
            return os.path.join(*fullname.split(".")) + ".so"
        return str(super().get_ext_filename(fullname))

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return [] if ext.name == CAP_MODULE else list(super().get_export_symbols(ext))


setup(
    ext_modules=[
        Extension(
            CAP_MODULE,
            sources=["src/chronos/native/chronos_cap.c"],
            depends=["src/chronos/native/chronos_cap.h"],
            # -O2 and sibling calls keep dlsym's forward a tail call (RTLD_NEXT needs it);
            # hidden visibility exports only the cu* entry points and dlsym.
            extra_compile_args=[
                "-std=gnu11",
                "-O2",
                "-foptimize-sibling-calls",
                "-fvisibility=hidden",
            ],
            libraries=["dl", "pthread"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildCapLibrary},
)
