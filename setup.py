"""Build the Cython kernels in ``ext/`` as ``guard._ext.<name>``.

Every extension is optional: without a working C compiler the build warns and
installs the pure-Python package, whose twins in ``guard._py`` take over.
"""

import platform
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# The kernels' branch-free checks vectorise only with 64-bit lane compares
# (SSE4.2); NumPy itself requires x86-64-v2, which includes them, since 2.4.
X86_64 = platform.machine().lower() in {"x86_64", "amd64"} and sys.platform != "win32"
COMPILE_ARGS = ["-msse4.2"] if X86_64 else []

extensions = cythonize(
    [
        Extension(f"guard._ext.{pyx.stem}", [str(pyx)], extra_compile_args=COMPILE_ARGS)
        for pyx in sorted(Path("ext").glob("*.pyx"))
    ],
    compiler_directives={"language_level": "3"},
)
for extension in extensions:
    extension.optional = True  # cythonize drops ``optional``; keep the pure-Python fallback

setup(ext_modules=extensions)
