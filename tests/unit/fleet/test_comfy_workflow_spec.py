"""A comfyui endpoint's workflow, as the admin API's body and the stack parameters' entries
take it: the same rules both ways (a graph and its node ids, or a checkpoint name for
ComfyUI's default graph; required on comfyui, refused elsewhere; each named node in the
graph with the input it is patched at; 64 KiB at most), refusals naming the field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from gpuqueue.fleet.endpoint_declarations import read_declarations
from gpuqueue.fleet.endpoint_specs import MAX_WORKFLOW_BYTES, default_workflow
from gpuqueue.fleet.fleet_admin import EndpointSpec
from gpuqueue.gpu.credentials import CredentialScope
from gpuqueue.models import ComfyWorkflow, Endpoint, EndpointProtocol, TaskKind

URL = "http://comfy.internal:8188"
WORKFLOW = default_workflow("sd15.safetensors")


def admin_refusal(body: dict[str, Any]) -> tuple[str, str] | None:
    """(field, reason) of the admin API's first refusal, None when it accepts."""
    try:
        EndpointSpec.model_validate({"url": URL, "kind": "image", **body})
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        return ".".join(str(p) for p in first["loc"]), first["msg"]
    return None


def declaration_refusal(entry: dict[str, Any]) -> tuple[str, str] | None:
    declared = read_declarations(
        urls={},
        entries={TaskKind.IMAGE: json.dumps([{"url": URL, **entry}])},
        scope=CredentialScope(),
    )[TaskKind.IMAGE]
    if not declared.errors:
        return None
    first = declared.errors[0]
    return first.field or "", first.message


def both(entry: dict[str, Any]) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    return admin_refusal(entry), declaration_refusal(entry)


def with_graph(**changes: Any) -> dict[str, Any]:
    workflow = copy.deepcopy(WORKFLOW)
    workflow.update(changes)
    return workflow


def test_a_graph_with_its_node_ids_is_accepted_both_ways() -> None:
    assert both({"protocol": "comfyui", "workflow": WORKFLOW}) == (None, None)


def test_a_checkpoint_name_alone_is_comfyuis_default_graph_loading_it() -> None:
    spec = EndpointSpec.model_validate(
        {"url": URL, "kind": "image", "protocol": "comfyui", "workflow": {"checkpoint": "x.ckpt"}}
    )
    declared = read_declarations(
        urls={},
        entries={
            TaskKind.IMAGE: json.dumps(
                [{"url": URL, "protocol": "comfyui", "workflow": {"checkpoint": "x.ckpt"}}]
            )
        },
        scope=CredentialScope(),
    )[TaskKind.IMAGE].endpoints[0]

    assert spec.workflow is not None
    assert declared.workflow is not None
    assert spec.workflow.graph["4"]["inputs"]["ckpt_name"] == "x.ckpt"
    assert spec.workflow.model_dump() == declared.workflow.model_dump()
    assert (spec.workflow.prompt_node, spec.workflow.output_node) == ("6", "9")


@pytest.mark.parametrize(
    ("entry", "field", "reason"),
    [
        ({"protocol": "comfyui"}, "workflow", "a comfyui endpoint needs a workflow"),
        ({"protocol": "a1111", "workflow": WORKFLOW}, "workflow", "only comfyui endpoints"),
        ({"workflow": WORKFLOW}, "workflow", "only comfyui endpoints take a workflow, not openai"),
        (
            {"protocol": "comfyui", "workflow": with_graph(prompt_node="99")},
            "workflow.prompt_node",
            "node '99' is not in the graph",
        ),
        (
            {"protocol": "comfyui", "workflow": with_graph(size_node="4")},
            "workflow.size_node",
            "node '4' (CheckpointLoaderSimple) has no input 'width' to set",
        ),
        (
            {"protocol": "comfyui", "workflow": with_graph(steps_node="6")},
            "workflow.steps_node",
            "has no input 'steps'",
        ),
        (
            {"protocol": "comfyui", "workflow": with_graph(seed_input="noise_seed")},
            "workflow",
            "has no input 'noise_seed' to set (seed_input)",
        ),
        (
            {"protocol": "comfyui", "workflow": with_graph(graph={"1": {"nodes": []}})},
            "workflow.graph",
            "export the workflow with ComfyUI's 'Save (API)'",
        ),
        (
            {"protocol": "comfyui", "workflow": {**WORKFLOW, "sampler": "3"}},
            "workflow.sampler",
            "Extra inputs are not permitted",
        ),
        (
            {"protocol": "comfyui", "workflow": {"checkpoint": "x", "prompt_node": "6"}},
            "workflow",
            "give either 'checkpoint' alone",
        ),
    ],
)
def test_a_bad_workflow_is_refused_alike_naming_the_field(
    entry: dict[str, Any], field: str, reason: str
) -> None:
    admin, declaration = both(entry)

    assert admin is not None
    assert declaration is not None
    assert admin[0] == declaration[0] == field
    assert reason in admin[1]
    assert reason in declaration[1]


def test_a_graph_over_64_kib_is_refused_saying_where_it_would_be_kept() -> None:
    big = with_graph()
    big["graph"]["4"]["inputs"]["ckpt_name"] = "x" * MAX_WORKFLOW_BYTES

    admin, declaration = both({"protocol": "comfyui", "workflow": big})

    assert admin is not None
    assert declaration is not None
    assert admin[0] == declaration[0] == "workflow.graph"
    assert "at most 65536 (64 KiB)" in admin[1]
    assert "endpoint's row" in admin[1]


def test_the_row_keeps_the_workflow_as_json_text_and_reads_it_back() -> None:
    workflow = ComfyWorkflow.model_validate(WORKFLOW)
    endpoint = Endpoint.model_validate(
        {
            "endpoint_id": "comfy-1",
            "url": URL,
            "kind": "image",
            "protocol": EndpointProtocol.COMFYUI,
            "workflow": workflow.model_dump_json(),
        }
    )

    assert endpoint.workflow == workflow
    assert endpoint.workflow.graph["3"]["inputs"]["cfg"] == 8.0  # a float DynamoDB refuses
