"""The compiled modules, optional: everything else is in pyproject.toml.

Two small C modules for what every Celery task does, in Python too:
``cadscope.tracing._wirec`` writes the OTLP bytes of a task span and reads its ``traceparent``
(``cadscope/tracing/_wirec.c``), ``cadscope.metrics._valuesc`` writes a task's outcome count and
run time (``cadscope/metrics/_valuesc.c``). Where they cannot be built (no C compiler, no Python
headers) the install goes on without them, and the Python code, which gives the same results,
does the work (``CADSCOPE_COMPILED=0`` chooses it where they were built).
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension("cadscope.tracing._wirec", ["cadscope/tracing/_wirec.c"], optional=True, extra_compile_args=FLAGS),
        Extension(
            "cadscope.metrics._valuesc", ["cadscope/metrics/_valuesc.c"], optional=True, extra_compile_args=FLAGS
        ),
    ]
)
