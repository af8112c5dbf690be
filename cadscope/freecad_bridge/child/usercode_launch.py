"""Runs a ``script`` job: the user's registered script, auto-instrumented, then its outputs.

Run as ``freecadcmd usercode_launch.py`` or ``python usercode_launch.py`` with
this folder first on ``PYTHONPATH``, so ``sitecustomize`` has already turned
auto-instrumentation on (``CADSCOPE_RUN_MODE=job``: the run's root spans are
this launcher's stages, and the manifest is its own):

- ``cad.stage generate``: the script, run as ``freecadcmd`` would run it (its
  ``__name__`` is its file's stem) or as ``python`` would (``__main__``). It
  reads its parameters with ``cadscope_child.parameters()`` and writes its
  outputs into its current directory (``cadscope_child.output_dir()``).
- ``cad.stage validate_export``: each output the job lists, if written, with
  its size and sha256. The worker checks them against the job's list.

An exception leaving the script (or ``sys.exit`` with a non-zero status) ends
the stage span with that error and no manifest: the job is a ``script_error``
with the script's own exception type and message, whatever the exit code says.
"""

import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cadscope_auto  # noqa: E402
import cadscope_child  # noqa: E402
from cadscope_job import sha256_file  # noqa: E402


def _run_script(path, run_name, argv0):
    saved_argv = sys.argv
    sys.argv = [argv0]
    try:
        runpy.run_path(path, run_name=run_name)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    finally:
        sys.argv = saved_argv


def main():
    with open(os.environ["CADSCOPE_JOB"]) as handle:
        payload = json.load(handle)
    job = payload["job"]
    out = os.environ["CADSCOPE_OUT"]
    run = cadscope_child._run
    probe = run.probe
    cadscope_auto.instrument()  # already done at start-up unless CADSCOPE_AUTO=0; idempotent
    key = job["script"]["uri"].rsplit("/", 1)[-1]
    stem = os.path.splitext(key)[0]
    # freecadcmd imports a script as a module named after its file; python runs it as __main__.
    run_name = stem if job["engine"] == "freecad" else "__main__"
    stage = probe.start("cad.stage generate", {"cad.stage": "generate", "cad.script.name": key[:128]})
    try:
        _run_script(payload["input_path"], run_name, key)
    except BaseException as exc:
        probe.end(stage, {}, exc)
        run.fail(exc)
        run.flush_counts()
        raise
    probe.end(stage, {})

    with probe.span("cad.stage validate_export", {"cad.stage": "validate_export"}):
        artifacts = []
        for output in job["outputs"]:
            name = "%s.%s" % (output["name"], output["format"])
            path = os.path.join(out, name)
            if os.path.isfile(path):
                artifacts.append(
                    {
                        "name": name,
                        "format": output["format"],
                        "size": os.path.getsize(path),
                        "sha256": sha256_file(path),
                        "deterministic": None,
                    }
                )
        probe.progress(kind="script", phase="outputs", found=len(artifacts), expected=len(job["outputs"]))

    run.manifest = lambda: {
        "job_id": job.get("job_id"),
        "kind": "script",
        "engine": job["engine"],
        "artifacts": artifacts,
        "result": dict(run.result),
        "auto": {k: v for k, v in cadscope_auto.status().items() if k in ("spans", "observed", "failures")},
    }
    run.finish()


main()
