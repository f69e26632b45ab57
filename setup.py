"""The compiled request path (``limiter/_requestpath.c``); everything else is in pyproject.toml.

Optional: without a C compiler the package installs without it and runs in pure Python
(``limiter/compiled.py``). ``-ffp-contract=off``: no fused multiply-add, so that its float
arithmetic is the pure-Python closure's, bit for bit.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "limiter._requestpath",
            ["limiter/_requestpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-ffp-contract=off"],
        )
    ]
)
