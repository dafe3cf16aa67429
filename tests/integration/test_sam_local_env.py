"""events/env.local.json: what `make invoke-<fn>` hands `sam local invoke`."""

from __future__ import annotations

import json
from pathlib import Path

from gpuqueue_local.sam_env import generate
from gpuqueue_local.template import load_template, resources_of_type

ENV_FILE = Path(__file__).resolve().parents[2] / "events" / "env.local.json"


def test_env_file_keys_are_exactly_the_templates_functions():
    functions = set(resources_of_type(load_template(), "AWS::Serverless::Function"))
    assert set(json.loads(ENV_FILE.read_text())) == functions


def test_env_file_is_what_the_template_generates(monkeypatch):
    # Regenerate with: PYTHONPATH=local .venv/bin/python -m gpuqueue_local.sam_env \
    #   > events/env.local.json
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert json.loads(ENV_FILE.read_text()) == generate()


def test_env_file_points_every_function_at_the_local_stack_from_docker():
    for function, env in json.loads(ENV_FILE.read_text()).items():
        assert env["AWS_ENDPOINT_URL"] == "http://host.docker.internal:5000", function
        assert "127.0.0.1" not in json.dumps(env), function
