"""Build the Cython core (the wire, the direct-run loop) unless VIRNET_NO_EXTENSIONS is set.

Everything else about the package lives in pyproject.toml; this file only lists the
extension modules, the switches that shape their build, and the man pages and completion
scripts installed under ``<prefix>/share``:

- ``VIRNET_NO_EXTENSIONS=1``: build nothing; the pure-Python core is used at import time.
- ``VIRNET_DEBUG=1``: annotate, line tracing, and ``VIRNET_DEBUG`` defined for the C code.
"""

import os

from setuptools import setup

NO_EXTENSIONS = bool(os.environ.get("VIRNET_NO_EXTENSIONS"))
DEBUG = bool(os.environ.get("VIRNET_DEBUG"))


def extensions() -> list:
    if NO_EXTENSIONS:
        print("*** VIRNET_NO_EXTENSIONS is set: pure-Python build, no Cython core ***")
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    macros = [("CYTHON_TRACE", "1"), ("VIRNET_DEBUG", "1")] if DEBUG else []
    ext = [
        Extension(
            f"virnet.{name}",
            [f"pyx/virnet/{name}.pyx"],
            include_dirs=["pyx/virnet"],
            define_macros=macros,
            extra_compile_args=["-O2"],
        )
        for name in ("_wire", "_direct_loop")
    ]
    return cythonize(
        ext,
        include_path=["pyx"],
        annotate=DEBUG,
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            "linetrace": DEBUG,
        },
    )


# Generated from the parsers by `python -m virnet.cli._gen` (a test checks they are
# current); installed under <prefix>/share where man(1) and the shells look.
DATA_FILES = [
    ("share/man/man1", ["share/man/man1/virnet.1", "share/man/man1/virnetd.1"]),
    ("share/bash-completion/completions",
     ["share/bash-completion/completions/virnet", "share/bash-completion/completions/virnetd"]),
    ("share/zsh/site-functions",
     ["share/zsh/site-functions/_virnet", "share/zsh/site-functions/_virnetd"]),
]

setup(ext_modules=extensions(), data_files=DATA_FILES)
