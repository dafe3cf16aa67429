"""What a valid endpoint configuration is, wherever it comes from: the admin API's body
(`fleet_admin.EndpointSpec`) and the stack parameters' entries (`endpoint_declarations`)
share these rules, so an endpoint one accepts the other accepts too."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gpuqueue.models import ComfyWorkflow, CredentialRef, EndpointProtocol, TaskKind

ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
MAX_URL_LENGTH = 2048
MAX_CAPACITY = 64
MAX_WEIGHT = 100
# A ComfyUI workflow lives in its endpoint's row: bounded far under DynamoDB's 400 KB item
# (and under what every dispatcher's fleet scan reads per endpoint).
MAX_WORKFLOW_BYTES = 64 * 1024
NODE_ID_PATTERN = r"^[A-Za-z0-9:._-]{1,64}$"


def endpoint_id_for(kind: TaskKind, url: str) -> str:
    """Stable id for a declared URL, so redeploys and re-checks update the same row."""
    return f"{kind.value}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def base_url(value: str) -> str:
    """An http(s) base URL without credentials, query or fragment; no trailing slash."""
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError("must not contain whitespace or control characters")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("must name a host")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError("must be a base URL, without a query or fragment")
    return value.rstrip("/")


EndpointUrl = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_URL_LENGTH),
    AfterValidator(base_url),
]
EndpointId = Annotated[str, StringConstraints(pattern=ENDPOINT_ID_PATTERN)]


def protocol_problem(kind: TaskKind, protocol: EndpointProtocol) -> str | None:
    # Speech endpoints speak one protocol: OpenAI-compatible /v1/audio/transcriptions.
    if kind is TaskKind.SPEECH and protocol is not EndpointProtocol.OPENAI:
        return "speech endpoints speak the openai protocol only"
    return None


def callback_problem(
    protocol: EndpointProtocol, callback: bool, *, progress: bool = True
) -> str | None:
    # Only Cog starts a job and reports its end by webhook (`Prefer: respond-async`).
    if (callback or not progress) and protocol is not EndpointProtocol.COG:
        return "callback mode is for cog endpoints only (Cog's webhooks)"
    return None


class CredentialSpec(CredentialRef):
    """A credential reference as an operator writes it: unknown keys are refused (a typo
    such as "secert" must not silently send no credentials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def workflow_problem(protocol: EndpointProtocol, workflow: ComfyWorkflow | None) -> str | None:
    """Why this protocol cannot have (or lacks) this workflow; None when they go together."""
    if protocol is EndpointProtocol.COMFYUI and workflow is None:
        return "a comfyui endpoint needs a workflow (its graph and node ids, or a checkpoint)"
    if protocol is not EndpointProtocol.COMFYUI and workflow is not None:
        return f"only comfyui endpoints take a workflow, not {protocol.value}"
    return None


# ComfyUI's default text-to-image graph in API format (its script_examples/
# basic_api_example.py): what an endpoint given only a checkpoint name runs.
DEFAULT_TXT2IMG_GRAPH: dict[str, dict[str, Any]] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 0,
            "steps": 20,
            "cfg": 8.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ""}},
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 512, "height": 512, "batch_size": 1},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "gpuqueue", "images": ["8", 0]}},
}
DEFAULT_TXT2IMG_NODES = {
    "prompt_node": "6",
    "negative_node": "7",
    "seed_node": "3",
    "size_node": "5",
    "steps_node": "3",
    "output_node": "9",
}
# Where each node id field patches its node: the inputs that node must have.
PATCHED_INPUTS: dict[str, tuple[str, ...]] = {
    "prompt_node": ("text",),
    "negative_node": ("text",),
    "size_node": ("width", "height"),
    "steps_node": ("steps",),
    "output_node": (),
}


def default_workflow(checkpoint: str) -> dict[str, Any]:
    """ComfyUI's default txt2img workflow loading `checkpoint` (a file in models/checkpoints)."""
    graph = copy.deepcopy(DEFAULT_TXT2IMG_GRAPH)
    graph["4"]["inputs"]["ckpt_name"] = checkpoint
    return {"graph": graph, **DEFAULT_TXT2IMG_NODES}


NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]


class ComfyWorkflowSpec(ComfyWorkflow):
    """A workflow as an operator writes it: the graph and node ids, or just `checkpoint` (a
    checkpoint file name: ComfyUI's default txt2img graph loading it). Every named node
    must be in the graph with the input it is patched at; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    graph: dict[str, dict[str, Any]] = Field(min_length=1)
    prompt_node: NodeId
    negative_node: NodeId | None = None
    seed_node: NodeId | None = None
    seed_input: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "seed"
    size_node: NodeId | None = None
    steps_node: NodeId | None = None
    output_node: NodeId

    @model_validator(mode="before")
    @classmethod
    def _default_graph_for_a_checkpoint(cls, value: Any) -> Any:
        if isinstance(value, dict) and "checkpoint" in value:
            checkpoint = value["checkpoint"]
            if set(value) != {"checkpoint"}:
                raise ValueError("give either 'checkpoint' alone or a graph and its node ids")
            if not isinstance(checkpoint, str) or not 1 <= len(checkpoint) <= 255:
                raise ValueError("'checkpoint' must be a file name of 1-255 characters")
            return default_workflow(checkpoint)
        return value

    @field_validator("graph")
    @classmethod
    def _api_format(cls, graph: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for node_id, node in graph.items():
            if not isinstance(node.get("class_type"), str) or not isinstance(
                node.get("inputs"), dict
            ):
                raise ValueError(
                    f"node {node_id!r} needs 'class_type' and 'inputs': export the workflow "
                    "with ComfyUI's 'Save (API)', not 'Save'"
                )
        size = len(json.dumps(graph, separators=(",", ":")).encode())
        if size > MAX_WORKFLOW_BYTES:
            raise ValueError(
                f"is {size} bytes as JSON; at most {MAX_WORKFLOW_BYTES} (64 KiB) are kept in "
                "the endpoint's row"
            )
        return graph

    @field_validator(
        "prompt_node", "negative_node", "size_node", "steps_node", "output_node", "seed_node"
    )
    @classmethod
    def _node_in_graph(cls, node_id: str | None, info: ValidationInfo) -> str | None:
        graph = info.data.get("graph")
        if node_id is None or graph is None:  # no graph: its own error says why
            return node_id
        node = graph.get(node_id)
        if node is None:
            raise ValueError(f"node {node_id!r} is not in the graph")
        assert info.field_name is not None
        inputs = node["inputs"]
        # The seed node's input is checked once seed_input is known (below).
        wanted = PATCHED_INPUTS.get(info.field_name, ())
        missing = [name for name in wanted if name not in inputs]
        if missing:
            raise ValueError(
                f"node {node_id!r} ({node['class_type']}) has no input {missing[0]!r} to set"
            )
        return node_id

    @model_validator(mode="after")
    def _seed_input_on_seed_node(self) -> ComfyWorkflowSpec:
        node = self.graph[self.seed_node] if self.seed_node is not None else None
        if node is not None and self.seed_input not in node["inputs"]:
            raise ValueError(
                f"seed_node {self.seed_node!r} ({node['class_type']}) has no input "
                f"{self.seed_input!r} to set (seed_input)"
            )
        return self


def plain_workflow(workflow: ComfyWorkflow | None) -> ComfyWorkflow | None:
    """The workflow as stored: a plain ComfyWorkflow, not the strict body class."""
    return None if workflow is None else ComfyWorkflow.model_validate(workflow.model_dump())
