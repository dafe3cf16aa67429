"""AWS's numeric limits on what the stack deploys, which SAM hides inside its events.

Read on the template after SAM's transform (what CloudFormation gets: the event source
mappings, the functions with Globals applied) and evaluated for every value a parameter may
take, as far as the limits can tell them apart: its AllowedValues, else its Default,
MinValue and MaxValue plus the values the Conditions compare it with and their neighbours.
A deploy with any allowed parameters must not be refused (MaximumConcurrency outside
2-1000) nor misbehave (pollers over reserved concurrency, messages reappearing mid-call).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest

from gpuqueue_local.sam_transform import transformed_template
from gpuqueue_local.template import Resolver, parameter_values, resources_of_type

TRANSFORMED = transformed_template()
PARAMETERS: dict[str, dict[str, Any]] = TRANSFORMED["Parameters"]
CONDITIONS: dict[str, Any] = TRANSFORMED.get("Conditions", {})
RESOURCES: dict[str, dict[str, Any]] = TRANSFORMED["Resources"]
MAPPINGS = resources_of_type(TRANSFORMED, "AWS::Lambda::EventSourceMapping")
# Lambda's documented defaults when a property is left out.
SQS_DEFAULT_VISIBILITY_TIMEOUT = 30
LAMBDA_DEFAULT_TIMEOUT = 3
MAXIMUM_CONCURRENCY_RANGE = (2, 1000)


# --- evaluating a property for every allowed parameter value ------------------------------


def _compared_values(name: str, expression: Any) -> Iterator[str]:
    """Literals the conditions compare parameter `name` with (Fn::Equals [Ref name, x])."""
    if isinstance(expression, list):
        for item in expression:
            yield from _compared_values(name, item)
    elif isinstance(expression, dict):
        equals = expression.get("Fn::Equals")
        if isinstance(equals, list) and {"Ref": name} in equals:
            yield from (str(side) for side in equals if side != {"Ref": name})
        for value in expression.values():
            yield from _compared_values(name, value)


def allowed_values(name: str) -> list[str]:
    """The values of a parameter that can change a limit's outcome: every allowed value if
    listed, else the bounds, the default, and each value a condition compares it with and
    that value's neighbours (within the bounds)."""
    spec = PARAMETERS[name]
    if "AllowedValues" in spec:
        return [str(v) for v in spec["AllowedValues"]]
    values = {str(spec[key]) for key in ("Default", "MinValue", "MaxValue") if key in spec}
    compared = set(_compared_values(name, CONDITIONS))
    values |= compared
    if spec.get("Type") == "Number":
        low = Decimal(str(spec.get("MinValue", "-Infinity")))
        high = Decimal(str(spec.get("MaxValue", "Infinity")))
        for value in compared:
            try:
                middle = Decimal(value)
            except InvalidOperation:
                continue
            values |= {str(v) for v in (middle - 1, middle + 1) if low <= v <= high}
    return sorted(values)


def parameters_in(value: Any) -> set[str]:
    """The parameters a property depends on: its Refs, and those of the conditions it names."""
    found: set[str] = set()
    if isinstance(value, list):
        for item in value:
            found |= parameters_in(item)
    elif isinstance(value, dict):
        if isinstance(value.get("Ref"), str) and value["Ref"] in PARAMETERS:
            found.add(value["Ref"])
        for key in ("Fn::If", "Condition"):
            if key in value:
                name = value[key][0] if key == "Fn::If" else value[key]
                if isinstance(name, str) and name in CONDITIONS:
                    found |= parameters_in(CONDITIONS[name])
        for item in value.values():
            found |= parameters_in(item)
    return found


def deployments(*values: Any) -> Iterator[tuple[dict[str, str], Resolver]]:
    """One resolver per combination of the allowed values of the parameters `values` use
    (every other parameter at its default)."""
    names = sorted(set().union(*(parameters_in(v) for v in values)))
    for combination in itertools.product(*(allowed_values(n) for n in names)):
        chosen = dict(zip(names, combination, strict=True))
        resolver = Resolver(
            parameters=parameter_values(TRANSFORMED, chosen),
            pseudo={"AWS::Region": "us-east-1", "AWS::StackName": "gpuqueue"},
            conditions=CONDITIONS,
        )
        yield chosen, resolver


def number(value: Any, resolver: Resolver) -> Decimal:
    return Decimal(str(resolver.resolve(value)))


def target_of(reference: Any) -> str:
    """The logical id a Ref or Fn::GetAtt names."""
    if "Ref" in reference:
        return str(reference["Ref"])
    target = reference["Fn::GetAtt"]
    return str(target[0] if isinstance(target, list) else target.split(".", 1)[0])


def function_of(mapping_id: str) -> str:
    return target_of(MAPPINGS[mapping_id]["Properties"]["FunctionName"])


def queue_of(mapping_id: str) -> str | None:
    """The SQS queue a mapping reads, or None for another kind of source (a stream)."""
    source = target_of(MAPPINGS[mapping_id]["Properties"]["EventSourceArn"])
    return source if RESOURCES[source]["Type"] == "AWS::SQS::Queue" else None


SQS_MAPPINGS = sorted(m for m in MAPPINGS if queue_of(m) is not None)
SCALED_MAPPINGS = sorted(m for m in SQS_MAPPINGS if "ScalingConfig" in MAPPINGS[m]["Properties"])


def maximum_concurrency(mapping_id: str) -> Any:
    return MAPPINGS[mapping_id]["Properties"]["ScalingConfig"]["MaximumConcurrency"]


# --- the evaluation itself ------------------------------------------------------------------


def test_allowed_values_cover_bounds_default_and_what_conditions_compare() -> None:
    # Bounds and default 1, and 1 +/- 1 from the condition that sizes the lane's workers.
    assert allowed_values("PriorityLaneWorkers") == ["1", "1000", "2"]
    assert allowed_values("LogRetentionDays") == [
        str(v) for v in PARAMETERS["LogRetentionDays"]["AllowedValues"]
    ]
    assert parameters_in(maximum_concurrency("PriorityDispatcherFunctionPriorityQueue")) == {
        "PriorityLaneWorkers"
    }


def test_the_scaled_mappings_are_the_worker_pools() -> None:
    assert {function_of(m) for m in SCALED_MAPPINGS} >= {
        "DispatcherFunction",
        "PriorityDispatcherFunction",
        "WebhookFunction",
    }


# --- the limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("mapping_id", SCALED_MAPPINGS)
def test_maximum_concurrency_is_within_what_sqs_accepts_for_every_allowed_value(
    mapping_id: str,
) -> None:
    low, high = MAXIMUM_CONCURRENCY_RANGE
    refused = {
        str(chosen): value
        for chosen, resolver in deployments(maximum_concurrency(mapping_id))
        if not low <= (value := number(maximum_concurrency(mapping_id), resolver)) <= high
    }

    assert refused == {}, f"{mapping_id}: CloudFormation would refuse MaximumConcurrency"


@pytest.mark.parametrize(
    "function_id",
    sorted(
        f
        for f, r in resources_of_type(TRANSFORMED, "AWS::Lambda::Function").items()
        if "ReservedConcurrentExecutions" in r["Properties"]
        and any(function_of(m) == f for m in SQS_MAPPINGS)
    ),
)
def test_sqs_pollers_never_outnumber_the_functions_reserved_concurrency(function_id: str) -> None:
    """RELIABILITY.md item 5: pollers over reserved concurrency get throttled, burning
    receive counts and dead-lettering valid work."""
    mappings = [m for m in SQS_MAPPINGS if function_of(m) == function_id]
    assert all(m in SCALED_MAPPINGS for m in mappings), "a mapping without MaximumConcurrency"
    reserved = RESOURCES[function_id]["Properties"]["ReservedConcurrentExecutions"]
    maxima = [maximum_concurrency(m) for m in mappings]
    over = {
        str(chosen): (pollers, workers)
        for chosen, resolver in deployments(reserved, *maxima)
        if (pollers := sum(number(m, resolver) for m in maxima))
        > (workers := number(reserved, resolver))
    }

    assert over == {}


def test_the_dispatcher_pool_is_worker_pool_size_for_every_allowed_size() -> None:
    reserved = RESOURCES["DispatcherFunction"]["Properties"]["ReservedConcurrentExecutions"]
    (mapping,) = [m for m in SCALED_MAPPINGS if function_of(m) == "DispatcherFunction"]
    sizes = set()
    for chosen, resolver in deployments(reserved, maximum_concurrency(mapping)):
        size = Decimal(chosen["WorkerPoolSize"])
        assert number(reserved, resolver) == number(maximum_concurrency(mapping), resolver) == size
        sizes.add(size)

    bounds = {Decimal(str(PARAMETERS["WorkerPoolSize"][k])) for k in ("MinValue", "MaxValue")}
    assert sizes >= bounds


@pytest.mark.parametrize("mapping_id", SQS_MAPPINGS)
def test_a_queue_hides_a_message_for_six_timeouts_of_every_function_it_triggers(
    mapping_id: str,
) -> None:
    """RELIABILITY.md item 1: a shorter visibility timeout hands a message that is still
    being worked on to a second invocation, and drops throttled ones early."""
    queue = RESOURCES[queue_of(mapping_id) or ""]["Properties"]
    function = RESOURCES[function_of(mapping_id)]["Properties"]
    visibility = queue.get("VisibilityTimeout", SQS_DEFAULT_VISIBILITY_TIMEOUT)
    timeout = function.get("Timeout", LAMBDA_DEFAULT_TIMEOUT)
    short = {
        str(chosen): (number(visibility, resolver), number(timeout, resolver))
        for chosen, resolver in deployments(visibility, timeout)
        if number(visibility, resolver) < 6 * number(timeout, resolver)
    }

    assert short == {}, f"{queue_of(mapping_id)} -> {function_of(mapping_id)}"


LAMBDA_MAX_TIMEOUT = 900  # seconds: Lambda refuses a longer Timeout
LAMBDA_MEMORY_RANGE = (128, 10_240)  # MB
SQS_MAX_VISIBILITY_TIMEOUT = 43_200  # 12 hours


@pytest.mark.parametrize(
    "function_id", sorted(resources_of_type(TRANSFORMED, "AWS::Lambda::Function"))
)
def test_every_function_asks_for_a_timeout_and_memory_lambda_accepts(function_id: str) -> None:
    props = RESOURCES[function_id]["Properties"]
    timeout = props.get("Timeout", LAMBDA_DEFAULT_TIMEOUT)
    memory = props.get("MemorySize", 128)
    refused = {
        str(chosen): (number(timeout, resolver), number(memory, resolver))
        for chosen, resolver in deployments(timeout, memory)
        if not 1 <= number(timeout, resolver) <= LAMBDA_MAX_TIMEOUT
        or not LAMBDA_MEMORY_RANGE[0] <= number(memory, resolver) <= LAMBDA_MEMORY_RANGE[1]
    }

    assert refused == {}


@pytest.mark.parametrize("queue_id", sorted(resources_of_type(TRANSFORMED, "AWS::SQS::Queue")))
def test_every_queue_hides_a_message_no_longer_than_sqs_allows(queue_id: str) -> None:
    visibility = RESOURCES[queue_id]["Properties"].get(
        "VisibilityTimeout", SQS_DEFAULT_VISIBILITY_TIMEOUT
    )
    refused = {
        str(chosen): number(visibility, resolver)
        for chosen, resolver in deployments(visibility)
        if not 0 <= number(visibility, resolver) <= SQS_MAX_VISIBILITY_TIMEOUT
    }

    assert refused == {}


# --- reserved concurrency: the API's functions and the account's unreserved pool ----------

ACCOUNT_CONCURRENCY = 1000  # Lambda's default concurrent executions per account and Region
MIN_UNRESERVED = 100  # AWS refuses a reservation that leaves the account less unreserved
API_FUNCTIONS = {"AuthFunction", "SubmitFunction", "TasksFunction", "SpeechFunction"}


def test_the_defaults_reserve_the_apis_concurrency_and_leave_the_account_its_unreserved_pool():
    """A flood of one route (or of held `Prefer: wait` requests) cannot take the account's
    concurrency from the others: each API function has its own reservation, and with the
    dispatchers' they still leave at least 100 of a default 1,000 account unreserved."""
    ((_, resolver),) = deployments()
    reserved = {
        function_id: number(value, resolver)
        for function_id, resource in resources_of_type(TRANSFORMED, "AWS::Lambda::Function").items()
        if (value := resource["Properties"].get("ReservedConcurrentExecutions")) is not None
        and resolver.resolve(value) is not None
    }

    assert set(reserved) >= API_FUNCTIONS | {"DispatcherFunction", "PriorityDispatcherFunction"}
    assert all(reserved[f] >= 1 for f in API_FUNCTIONS)
    assert ACCOUNT_CONCURRENCY - sum(reserved.values()) >= MIN_UNRESERVED


@pytest.mark.parametrize("function_id", sorted(API_FUNCTIONS))
def test_an_api_reservation_of_zero_leaves_the_function_on_the_shared_pool(function_id: str):
    """0 means no reservation (Lambda reads a reserved 0 as: never run)."""
    name = function_id.removesuffix("Function") + "ReservedConcurrency"
    value = RESOURCES[function_id]["Properties"]["ReservedConcurrentExecutions"]
    resolver = Resolver(
        parameters=parameter_values(TRANSFORMED, {name: "0"}),
        pseudo={"AWS::Region": "us-east-1", "AWS::StackName": "gpuqueue"},
        conditions=CONDITIONS,
    )

    assert resolver.resolve(value) is None
