"""Builds the optional C++ extension sparselayer._C; all metadata lives in pyproject.toml."""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "sparselayer._C",
        ["csrc/packing.cpp", "csrc/delta.cpp"],
        cxx_std=17,
        extra_compile_args=["/O2"] if sys.platform == "win32" else ["-O3"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
