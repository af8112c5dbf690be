"""The job reference: docs/jobs.md and the shipped JSON Schema are generated from the
job models and current; the API serves the schema and shows it as the body of
``POST /v1/jobs``; every example in examples/ validates, and runs through the real
API and worker."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from cadscope.api import ApiSettings, create_app
from cadscope.freecad_bridge import JobSpec, schema_docs

from .conftest import REPO, wait_until

EXAMPLES = REPO / "examples"


def test_the_reference_and_the_shipped_schema_are_current():
    for path, text in schema_docs.outputs().items():
        assert path.read_text() == text, f"{path} is stale: run python -m cadscope.freecad_bridge.schema_docs"
    assert schema_docs.main(["--check"]) == 0


def test_the_reference_names_every_field_of_every_model():
    """Read from the models themselves: a field added to one appears in the reference."""
    text = (REPO / "docs" / "jobs.md").read_text()
    schema = JobSpec.model_json_schema()
    models = {"JobSpec": schema, **{k: v for k, v in schema["$defs"].items() if k != "JsonValue"}}
    for name, model in models.items():
        section = text.split(f"\n### {name}\n", 1)
        assert len(section) == 2, f"no section for {name}"
        body = section[1].split("\n### ", 1)[0]
        for field in model["properties"]:
            assert f"| `{field}` |" in body, f"{name}.{field} is missing from docs/jobs.md"


def test_the_generator_reads_the_models_not_a_copy():
    """A model changed at run time changes the page: nothing is cached from an earlier run."""
    before = schema_docs.render_reference()
    field = JobSpec.model_fields["timeout_s"]
    original = field.description
    try:
        field.description = "A description only this test gives."
        JobSpec.model_rebuild(force=True)
        assert "A description only this test gives." in schema_docs.render_reference()
    finally:
        field.description = original
        JobSpec.model_rebuild(force=True)
    assert schema_docs.render_reference() == before


def test_every_example_validates_and_pins_the_files_it_names():
    kinds = set()
    for filename, kind, _what in schema_docs.EXAMPLES:
        spec = JobSpec.model_validate_json((EXAMPLES / filename).read_text())
        assert spec.flow_type == kind, filename
        kinds.add(kind)
        stored = spec.stored_document()
        if stored is not None:
            path = EXAMPLES / "store" / stored.uri.removeprefix("store://")
            assert hashlib.sha256(path.read_bytes()).hexdigest() == stored.sha256, f"{filename}: {path}"
    assert kinds == {"parametric", "upload", "script", "template"}
    prompt = json.loads((EXAMPLES / schema_docs.PROMPT_EXAMPLE).read_text())
    assert set(prompt) <= {"prompt", "engine"} and prompt["prompt"]


async def _get(app: Any, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        return await client.get(path)


def test_the_api_serves_the_schema_and_shows_it_as_the_jobs_body(tmp_path, redis_url):
    import asyncio

    app = create_app(ApiSettings(token="t", broker_url=redis_url, data_dir=tmp_path))
    served = asyncio.run(_get(app, "/v1/schema/job"))
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("application/schema+json")
    assert served.json() == schema_docs.job_json_schema()

    document = asyncio.run(_get(app, "/openapi.json")).json()
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"]
    components = document["components"]["schemas"]
    job = components[ref.rsplit("/", 1)[-1]]
    assert set(job["properties"]) == set(JobSpec.model_fields)
    # Every reference in the document resolves inside it.
    refs = set(_refs(document))
    assert refs and all(r.startswith("#/components/schemas/") and r.rsplit("/", 1)[-1] in components for r in refs)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


@pytest.mark.slow
def test_every_example_runs_through_the_api_and_a_worker(start_worker, start_api, engines, tmp_path):
    """As a user would: the worker's document store holds the examples' files, and each
    example is posted as ``curl -d @examples/FILE`` posts it (newlines dropped)."""
    store = tmp_path / "store"
    shutil.copytree(EXAMPLES / "store", store)
    worker = start_worker(env={"CADSCOPE_DOCUMENT_STORE": str(store)})
    api = start_api(worker)
    headers = {**api.headers(), "Content-Type": "application/json"}

    def post(path: str, file: Path) -> str:
        data = file.read_bytes().replace(b"\r", b"").replace(b"\n", b"")
        response = httpx.post(f"{api.url}{path}", content=data, headers=headers, timeout=30)
        assert response.status_code == 202, (file.name, response.text)
        return str(response.json()["job_id"])

    jobs = {name: post("/v1/jobs", EXAMPLES / name) for name, _kind, _what in schema_docs.EXAMPLES}
    jobs[schema_docs.PROMPT_EXAMPLE] = post("/v1/prompts", EXAMPLES / schema_docs.PROMPT_EXAMPLE)

    def finished(job_id: str) -> dict[str, Any] | None:
        body = httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=api.headers(), timeout=10).json()
        return body if body.get("state") == "finished" else None

    for name, job_id in jobs.items():
        body = wait_until(lambda job_id=job_id: finished(job_id), 240, interval=0.3, what=name)
        assert body["status"] == "succeeded", (name, body)
        assert body["artifacts"], name
    shutil.rmtree(store)
