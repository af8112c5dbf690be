"""Build an OCP engine environment for a given OCCT version: ``python -m tests.ocp_envs 7.9.3``.

Makes ``.ci-cache/ocp-<version>/`` (a venv with ``cadquery-ocp-novtk`` of that OCCT
version from PyPI, nothing else: the OCP engine's child needs only OCP and the
standard library) and prints its interpreter's path. An environment that already
imports OCP is kept as it is. Point ``CADSCOPE_OCP_PYTHONS`` at the interpreters
to run them side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

__all__ = ["CACHE", "env_python", "ensure_env"]

CACHE = Path(__file__).resolve().parent.parent / ".ci-cache"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def env_python(occt_version: str, cache: Path = CACHE) -> Path:
    """Where the interpreter of the environment for ``occt_version`` is (built or not)."""
    return cache / f"ocp-{occt_version}" / "bin" / "python"


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import OCP.BRepPrimAPI"], capture_output=True, timeout=120)  # noqa: S603
    return probe.returncode == 0


def ensure_env(occt_version: str, cache: Path = CACHE) -> Path:
    """The interpreter of an environment with OCP on OCCT ``occt_version``, built if need be."""
    if not _VERSION.fullmatch(occt_version):
        raise ValueError(f"an OCCT version is three numbers (7.9.3), not {occt_version!r}")
    python = env_python(occt_version, cache)
    if _works(python):
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(python.parent.parent)
    # The wheels are numbered <OCCT version>.<build>: ~= takes the newest build of that version.
    spec = f"cadquery-ocp-novtk~={occt_version}.0"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True, env=env)  # noqa: S603
    if not _works(python):
        raise RuntimeError(f"{python} does not import OCP after installing {spec}")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.ocp_envs", description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="OCCT versions, e.g. 7.9.3")
    args = parser.parse_args(argv)
    for version in args.versions:
        try:
            print(ensure_env(version))
        except (ValueError, RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"ocp_envs: {version}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
