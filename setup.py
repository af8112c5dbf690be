"""The one compiled module, optional: everything else is in pyproject.toml.

``cadscope.tracing._wirec`` writes the OTLP bytes of a task span (``cadscope/tracing/_wirec.c``).
Where it cannot be built (no C compiler, no Python headers) the install goes on without it, and the
Python encoder, which writes the same bytes, does the work.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cadscope.tracing._wirec",
            ["cadscope/tracing/_wirec.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
        )
    ]
)
