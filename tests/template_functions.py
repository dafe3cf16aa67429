"""The functions template.yaml declares, as the test harnesses need them: each one's handler
module and settings model, read from the template so a function added there needs no edit
in the harness (only its settings model, declared in gpuqueue.settings.SETTINGS_BY_HANDLER).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

from gpuqueue.settings import SETTINGS_BY_HANDLER
from gpuqueue_local.template import load_template, resources_of_type

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = load_template()
# Env vars every function gets (Globals) that Powertools reads, not a settings model.
GLOBAL_ENV: dict[str, Any] = (
    TEMPLATE.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {})
)


def _handler_module(function: dict[str, Any]) -> str:
    """`dispatcher_handler.lambda_handler` -> `dispatcher_handler`."""
    return str(function["Properties"]["Handler"]).rsplit(".", 1)[0]


# Logical id -> handler module, in the template's order.
HANDLER_MODULE_BY_FUNCTION: dict[str, str] = {
    logical_id: _handler_module(function)
    for logical_id, function in resources_of_type(TEMPLATE, "AWS::Serverless::Function").items()
}
# Every handler module once (tests import them all in one process, from functions/*).
HANDLER_MODULES: tuple[str, ...] = tuple(dict.fromkeys(HANDLER_MODULE_BY_FUNCTION.values()))
# Handler module -> the first function in the template that runs it (the normal lane's
# dispatcher, for the two dispatchers): whose role and environment a call to the module gets.
FUNCTION_BY_HANDLER_MODULE: dict[str, str] = {
    module: logical_id for logical_id, module in reversed(HANDLER_MODULE_BY_FUNCTION.items())
}
# The other functions sharing a module (the priority lane's dispatcher): their environment
# would clash with the first's in this one process, so a harness calls them with their own
# (integration: `deliver(lane="high")`).
SEPARATE_ENV: frozenset[str] = frozenset(
    set(HANDLER_MODULE_BY_FUNCTION) - set(FUNCTION_BY_HANDLER_MODULE.values())
)


def handler_path(logical_id: str) -> Path:
    """The file the function's CodeUri and Handler name."""
    props = TEMPLATE["Resources"][logical_id]["Properties"]
    return REPO / str(props["CodeUri"]) / f"{HANDLER_MODULE_BY_FUNCTION[logical_id]}.py"


def settings_model(logical_id: str) -> type[BaseSettings] | None:
    """The settings model the function reads (None: none); KeyError if none is declared."""
    return SETTINGS_BY_HANDLER[HANDLER_MODULE_BY_FUNCTION[logical_id]]


def sqs_consumer(queue: str) -> str:
    """The function whose SQS event source reads the queue (a logical id)."""
    (consumer,) = [
        logical_id
        for logical_id in HANDLER_MODULE_BY_FUNCTION
        for event in TEMPLATE["Resources"][logical_id]["Properties"].get("Events", {}).values()
        if event["Type"] == "SQS" and event["Properties"]["Queue"] == {"Fn::GetAtt": [queue, "Arn"]}
    ]
    return consumer


def environment_keys(logical_id: str) -> set[str]:
    """The env vars the template sets for the function, its Globals' included."""
    own = TEMPLATE["Resources"][logical_id]["Properties"].get("Environment", {})
    return set(GLOBAL_ENV) | set(own.get("Variables", {}))
