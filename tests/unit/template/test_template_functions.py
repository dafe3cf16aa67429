"""The harnesses' view of template.yaml's functions (tests/template_functions.py) covers every
function the template declares: a function added there is imported, its caches reset and its
role and environment used without an edit in the harness."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from gpuqueue_local.template import load_template, resources_of_type
from template_functions import (
    FUNCTION_BY_HANDLER_MODULE,
    HANDLER_MODULE_BY_FUNCTION,
    HANDLER_MODULES,
    SEPARATE_ENV,
    handler_path,
    sqs_consumer,
)

FUNCTIONS = sorted(resources_of_type(load_template(), "AWS::Serverless::Function"))


def test_every_function_in_the_template_has_its_handler_module() -> None:
    assert sorted(HANDLER_MODULE_BY_FUNCTION) == FUNCTIONS
    assert set(HANDLER_MODULES) == set(HANDLER_MODULE_BY_FUNCTION.values())
    assert len(HANDLER_MODULES) == len(set(HANDLER_MODULES))


@pytest.mark.parametrize("logical_id", FUNCTIONS)
def test_a_functions_handler_module_is_the_file_its_code_uri_names(logical_id: str) -> None:
    module = importlib.import_module(HANDLER_MODULE_BY_FUNCTION[logical_id])

    assert module.__file__ is not None
    assert Path(module.__file__).resolve() == handler_path(logical_id).resolve()
    assert callable(module.lambda_handler)


def test_every_function_is_called_with_its_own_role_and_environment() -> None:
    # Each one either is the function its module's calls run as, or is called with its own
    # environment (the priority lane's dispatcher, which shares the dispatcher's code).
    defaults = set(FUNCTION_BY_HANDLER_MODULE.values())

    assert defaults | SEPARATE_ENV == set(FUNCTIONS)
    assert defaults & SEPARATE_ENV == set()
    assert sorted(SEPARATE_ENV) == ["PriorityDispatcherFunction"]
    assert FUNCTION_BY_HANDLER_MODULE["dispatcher_handler"] == "DispatcherFunction"


def test_each_lanes_queue_has_its_own_dispatcher() -> None:
    assert sqs_consumer("TaskQueue") == "DispatcherFunction"
    assert sqs_consumer("PriorityQueue") == "PriorityDispatcherFunction"
