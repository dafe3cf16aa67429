"""EndpointRegistry: the endpoints ("health") table.

One table holds four kinds of rows, each carrying `kind`, so a single Query on the `by-kind`
index returns a kind's whole fleet state (and a consistent Scan filtered on `kind`, which
the dispatcher reads, a fleet state that shows every write made before it):
  - endpoint rows (`row_type` "endpoint"): configuration + health, keyed by endpoint id;
  - slot rows (`row_type` "slot", key "<endpoint id>#slot#<n>"): a lease on one of the
    endpoint's concurrent-call slots. A lease expires by itself, so a crashed dispatcher
    never leaks capacity; taking one is a conditional write, so two dispatchers never
    hold the same slot;
  - seat rows (`row_type` "seat", key "<kind>#priority-lane#slot#<n>"): the high-priority
    lane's seats, leased like slots. A high-priority call holds a seat beside its slot, so
    the lane never holds more slots of a kind than it has seats, exactly (conditional
    writes on the base table, not a count read from the eventually consistent index);
  - waiter rows (`row_type` "waiter"): a high-priority request waiting for a slot.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError

from gpuqueue.fleet.endpoint_declarations import DeclaredEndpoint
from gpuqueue.fleet.endpoint_specs import endpoint_id_for
from gpuqueue.models import (
    CircuitState,
    CredentialRef,
    Endpoint,
    EndpointState,
    HealthResult,
    SlotLease,
    TaskKind,
)
from gpuqueue.store.dynamodb_conditions import is_conditional_failure
from gpuqueue.store.sdk_errors import raises_store_error

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

KIND_INDEX = "by-kind"
PARAMETER_SOURCE = "parameter"
ADMIN_SOURCE = "admin"
ENDPOINT_ROW = "endpoint"
SLOT_ROW = "slot"
WAITER_ROW = "waiter"
SEAT_ROW = "seat"
NON_ENDPOINT_ROWS = frozenset({SLOT_ROW, WAITER_ROW, SEAT_ROW})
# Latency EWMA weight of the newest sample.
EWMA_ALPHA = 0.3
# A call this many times slower or faster than a slot's average is a step change (another
# model, another GPU), not noise: the average restarts from it, or the tail rule and the
# early receive would go by the old speed for several calls.
EWMA_STEP_RATIO = 4.0


__all__ = ["EndpointRegistry", "Fleet", "endpoint_id_for"]


def _slot_key(endpoint_id: str, slot: int) -> str:
    return f"{endpoint_id}#slot#{slot}"


def priority_lane_id(kind: TaskKind) -> str:
    """What a seat lease names in place of an endpoint: the lane, per kind of GPU."""
    return f"{kind.value}#priority-lane"


def _waiter_key(kind: TaskKind, task_id: str) -> str:
    return f"{kind.value}#waiter#{task_id}"


def _num(value: float) -> Decimal:
    return Decimal(str(round(value, 3)))


def _ewma(previous: float | None, sample: float | None) -> float | None:
    """A slot's call-duration EWMA after one more call (unchanged without a sample)."""
    if sample is None:
        return previous
    if (
        previous is None
        or sample > EWMA_STEP_RATIO * previous
        or previous > EWMA_STEP_RATIO * sample
    ):
        return sample
    return EWMA_ALPHA * sample + (1 - EWMA_ALPHA) * previous


# pragma: no mutate start (make mutate covers the lease parts only)
def _credentials_item(credentials: CredentialRef) -> dict[str, str]:
    """A credential reference as a DynamoDB map: names only (never a value), no nulls."""
    return credentials.model_dump(mode="json", exclude_none=True)


# pragma: no mutate end
def call_started(lease: SlotLease, service: float, now: float) -> float:
    """When the slot's current call started, as its row tells: the lease's start; for a
    slot kept across calls (whose holder writes only now and then), the start of the call
    that back-to-back calls of `service` seconds from the lease's start would be in now.
    The holder writes the row again before that reckoning drifts (HeldSlot.renew_for)."""
    start = lease.leased_at if lease.leased_at is not None else now
    if lease.kept and service > 0 and now > start:
        start += service * math.floor((now - start) / service)
    return start


@dataclass
class Fleet:
    """A kind's rows, read in one query: its endpoints, their slots' live leases, and the
    high-priority lane's seat leases and waiters."""

    endpoints: list[Endpoint]
    leases: dict[str, list[SlotLease]] = field(default_factory=dict)
    # endpoint id -> slot -> that slot's call-duration EWMA (seconds), kept on the slot rows.
    call_seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    # task id -> until when its high-priority wait for a slot stands.
    priority_waiters: dict[str, float] = field(default_factory=dict)
    # The high-priority lane's seat leases (one per slot the lane holds).
    priority_seats: list[SlotLease] = field(default_factory=list)

    def free_priority_seats(self, now: float, seats: int) -> list[int]:
        """The lane's seats (0 .. seats-1) no live lease holds."""
        held = {lease.slot for lease in self.priority_seats if lease.is_live(now)}
        return [seat for seat in range(seats) if seat not in held]

    def waiting_priority(self, now: float, *, besides: str | None = None) -> int:
        """High-priority tasks waiting for a slot now (other than `besides`)."""
        return sum(
            1
            for task_id, until in self.priority_waiters.items()
            if until > now and task_id != besides
        )

    # pragma: no mutate start (call times, not leases)
    def service_seconds(self, endpoint: Endpoint, now: float | None = None) -> float | None:
        """How long a call on this endpoint takes, as its slots have measured (None: unknown);
        with `now`, at least as long as its longest call under way has run: a call past the
        average says the endpoint is slower now (another model or GPU), and a slot whose
        call overran must not count as free."""
        samples = [
            seconds
            for slot, seconds in self.call_seconds.get(endpoint.endpoint_id, {}).items()
            if slot < endpoint.capacity
        ]
        if not samples:
            return None
        measured = sum(samples) / len(samples)
        if now is None:
            return measured
        running = [
            now - call_started(lease, measured, now)
            for lease in self.live_leases(endpoint.endpoint_id, now)
            if lease.leased_at is not None
        ]
        return max([measured, *running])

    def busy_until(self, endpoint: Endpoint, now: float) -> list[float]:
        """When each busy slot's call is expected to end: its start + the endpoint's service
        time (in the past for a call that overruns; `now` when nothing is known)."""
        service = self.service_seconds(endpoint, now) or 0.0
        return sorted(
            call_started(lease, service, now) + service
            for lease in self.live_leases(endpoint.endpoint_id, now)
        )

    def slot_free_times(self, endpoint: Endpoint, now: float) -> list[float]:
        """When each usable slot is expected to be free: now if free or overrunning, else
        when its call is expected to end."""
        busy = [max(now, t) for t in self.busy_until(endpoint, now)]
        free = max(0, endpoint.usable_capacity - len(busy))
        return sorted([now] * free + busy)

    # pragma: no mutate end
    def with_lease(self, lease: SlotLease) -> Fleet:
        """This read as it would be with `lease` taken since."""
        leases = {
            **self.leases,
            lease.endpoint_id: [*self.leases.get(lease.endpoint_id, []), lease],
        }
        return replace(self, leases=leases)

    def live_leases(self, endpoint_id: str, now: float) -> list[SlotLease]:
        return [lease for lease in self.leases.get(endpoint_id, []) if lease.is_live(now)]

    def in_flight(self, endpoint_id: str, now: float) -> int:
        return len(self.live_leases(endpoint_id, now))

    def free_slots(self, endpoint: Endpoint, now: float) -> list[int]:
        taken = {lease.slot for lease in self.live_leases(endpoint.endpoint_id, now)}
        free = [s for s in range(endpoint.capacity) if s not in taken]
        # Half-open: one trial call at a time.
        allowed = endpoint.usable_capacity - len(taken)
        return free[: max(0, allowed)]

    def routable(self, now: float, max_age_seconds: float) -> list[Endpoint]:
        # pragma: no mutate block (health, not leases)
        return [e for e in self.endpoints if e.is_routable(now, max_age_seconds)]


class EndpointRegistry:
    def __init__(self, table: Table) -> None:
        self._table = table

    # --- reads ------------------------------------------------------------------------------

    def _items(self, kind: TaskKind, *, consistent: bool) -> list[dict[str, Any]]:
        # The index is eventually consistent: a lease just taken or released may not show
        # for a while. The dispatcher, which chooses slots from the read, reads the base
        # table instead: a strongly consistent Scan, one request while the table (every
        # kind's endpoints, slots, seats and waiters, ~300 bytes a row) is under 1 MB, at
        # 1 RRU per 4 KB of it. The views (queue position, stats, admin, checker) make do
        # with the index at half the price for their kind's rows only.
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any]
        if consistent:
            kwargs = {"ConsistentRead": True, "FilterExpression": Attr("kind").eq(kind.value)}
        else:
            kwargs = {"IndexName": KIND_INDEX, "KeyConditionExpression": Key("kind").eq(kind.value)}
        read = self._table.scan if consistent else self._table.query
        while True:
            page = read(**kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def fleet(self, kind: TaskKind, *, consistent: bool = False) -> Fleet:
        """A kind's fleet state; `consistent` reads every write made before the call (for
        choosing a slot), otherwise the index's view, which may lag a little."""
        endpoints = []
        leases: dict[str, list[SlotLease]] = defaultdict(list)
        call_seconds: dict[str, dict[int, float]] = defaultdict(dict)
        waiters: dict[str, float] = {}
        seats: list[SlotLease] = []
        for item in self._items(kind, consistent=consistent):
            if item.get("row_type") == WAITER_ROW:
                waiters[str(item["task_id"])] = float(item["until"])
            elif item.get("row_type") == SEAT_ROW:
                if "lease_until" in item:
                    seats.append(SlotLease.model_validate(item | {"endpoint_id": item["slot_of"]}))
            elif item.get("row_type") == SLOT_ROW:
                if "lease_until" in item:
                    lease = SlotLease.model_validate(item | {"endpoint_id": item["slot_of"]})
                    leases[lease.endpoint_id].append(lease)
                if "call_seconds_ewma" in item:
                    call_seconds[item["slot_of"]][int(item["slot"])] = float(
                        item["call_seconds_ewma"]
                    )
            else:
                endpoints.append(Endpoint.model_validate(item))
        endpoints.sort(key=lambda e: e.endpoint_id)
        return Fleet(
            endpoints=endpoints,
            leases=dict(leases),
            call_seconds=dict(call_seconds),
            priority_waiters=waiters,
            priority_seats=seats,
        )

    # pragma: no mutate start (configuration and health, not leases)
    def endpoints(self, kind: TaskKind) -> list[Endpoint]:
        return self.fleet(kind).endpoints

    def routable(
        self, kind: TaskKind, *, max_age_seconds: float, now: float | None = None
    ) -> list[Endpoint]:
        now = time.time() if now is None else now
        return self.fleet(kind).routable(now, max_age_seconds)

    @raises_store_error("endpoints table")
    def get(self, endpoint_id: str) -> Endpoint | None:
        item = self._table.get_item(Key={"endpoint_id": endpoint_id}, ConsistentRead=True).get(
            "Item"
        )
        if not item or item.get("row_type") in NON_ENDPOINT_ROWS:
            return None
        return Endpoint.model_validate(item)

    # --- configuration ----------------------------------------------------------------------

    def sync_declared(
        self,
        kind: TaskKind,
        declared: Sequence[DeclaredEndpoint],
        *,
        remove_undeclared: bool = True,
    ) -> list[Endpoint]:
        """Upsert the endpoints the stack parameters declare; drop declared rows no longer
        listed (unless `remove_undeclared` is False: a refused entry must not take its
        endpoint away).

        URL, protocol and credentials are the declaration's. Health and the operator's
        state survive the upsert, so a redeploy neither marks a good endpoint unknown nor
        undoes a drain. Capacity and weight: a figure the declaration gives is applied when
        it changes (a deploy); an operator's resize through the admin API holds until then.
        Rows added through the admin API are left alone.
        """
        current = {e.endpoint_id: e for e in self.endpoints(kind)}
        for endpoint in declared:
            self._declare(kind, endpoint, current.get(endpoint.endpoint_id))
        if remove_undeclared:
            wanted = {e.endpoint_id for e in declared}
            for row in current.values():
                if row.source == PARAMETER_SOURCE and row.endpoint_id not in wanted:
                    self.delete(row.endpoint_id)
        return self.endpoints(kind)

    def _declare(self, kind: TaskKind, declared: DeclaredEndpoint, row: Endpoint | None) -> None:
        always: dict[str, Any] = {
            "url": declared.url,
            "kind": kind.value,
            "protocol": declared.protocol.value,
            "callback": declared.callback,
            "callback_progress": declared.callback_progress,
            "source": PARAMETER_SOURCE,
            "row_type": ENDPOINT_ROW,
        }
        keep_if_set: dict[str, Any] = {
            "capacity": 1,
            "weight": 1,
            "state": EndpointState.ACTIVE.value,
            "healthy": False,
            "consecutive_failures": 0,
            "circuit": CircuitState.CLOSED.value,
        }
        removes: list[str] = []
        for name, figure in (("capacity", declared.capacity), ("weight", declared.weight)):
            marker = f"declared_{name}"
            if figure is None:
                removes.append(marker)  # no longer declared: the current figure stays
            elif row is None or getattr(row, marker) != figure:
                del keep_if_set[name]  # newly declared or changed: apply it
                always[name] = figure
                always[marker] = figure
        if declared.credentials is None:
            removes.append("credentials")
        else:
            always["credentials"] = _credentials_item(declared.credentials)
        if declared.workflow is None:
            removes.append("workflow")
        else:
            always["workflow"] = declared.workflow.model_dump_json()
        # Every attribute through a placeholder: several (url, capacity) are reserved.
        names = {f"#{k}": k for k in [*always, *keep_if_set, *removes]}
        values: dict[str, Any] = {f":{k}": v for k, v in {**always, **keep_if_set}.items()}
        sets = [f"#{k} = :{k}" for k in always]
        sets += [f"#{k} = if_not_exists(#{k}, :{k})" for k in keep_if_set]
        expression = "SET " + ", ".join(sets)
        if removes:
            expression += " REMOVE " + ", ".join(f"#{k}" for k in removes)
        self._table.update_item(
            Key={"endpoint_id": declared.endpoint_id},
            UpdateExpression=expression,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def put(self, endpoint: Endpoint) -> Endpoint:
        """Add or replace an endpoint's configuration; its health survives a change."""
        config: dict[str, Any] = {
            "url": endpoint.url,
            "kind": endpoint.kind.value,
            "protocol": endpoint.protocol.value,
            "callback": endpoint.callback,
            "callback_progress": endpoint.callback_progress,
            "capacity": endpoint.capacity,
            "weight": endpoint.weight,
            "state": endpoint.state.value,
            "source": endpoint.source,
            "row_type": ENDPOINT_ROW,
        }
        removes = []
        if endpoint.credentials is None:
            removes.append("credentials")
        else:
            config["credentials"] = _credentials_item(endpoint.credentials)
        if endpoint.workflow is None:
            removes.append("workflow")
        else:
            # As JSON text: DynamoDB numbers refuse the graph's floats (cfg 8.0, denoise 1.0).
            config["workflow"] = endpoint.workflow.model_dump_json()
        defaults = {
            "healthy": False,
            "consecutive_failures": 0,
            "circuit": CircuitState.CLOSED.value,
        }
        names = {f"#{k}": k for k in [*config, *defaults, *removes]}
        values: dict[str, Any] = {f":{k}": v for k, v in {**config, **defaults}.items()}
        sets = [f"#{k} = :{k}" for k in config]
        sets += [f"#{k} = if_not_exists(#{k}, :{k})" for k in defaults]
        expression = "SET " + ", ".join(sets)
        if removes:
            expression += " REMOVE " + ", ".join(f"#{k}" for k in removes)
        result = self._table.update_item(
            Key={"endpoint_id": endpoint.endpoint_id},
            UpdateExpression=expression,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
        )
        return Endpoint.model_validate(result["Attributes"])

    def set_state(self, endpoint_id: str, state: EndpointState) -> Endpoint | None:
        try:
            result = self._table.update_item(
                Key={"endpoint_id": endpoint_id},
                UpdateExpression="SET #s = :s",
                ConditionExpression="attribute_exists(endpoint_id) AND #r <> :slot",
                ExpressionAttributeNames={"#s": "state", "#r": "row_type"},
                ExpressionAttributeValues={":s": state.value, ":slot": SLOT_ROW},
                ReturnValues="ALL_NEW",
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return None
            raise
        return Endpoint.model_validate(result["Attributes"])

    def delete(self, endpoint_id: str) -> bool:
        """Remove an endpoint. Its slot rows stay until their leases end (in-flight calls)."""
        try:
            self._table.delete_item(
                Key={"endpoint_id": endpoint_id},
                ConditionExpression="attribute_exists(endpoint_id)",
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        return True

    # --- health (the checker) ---------------------------------------------------------------

    def record_health(self, result: HealthResult, previous: Endpoint) -> None:
        """Write a probe result: EWMA latency, failure count, circuit transitions."""
        now = result.checked_at
        sets = {
            "healthy": result.healthy,
            "last_checked_at": _num(now),
            "latency_ms": _num(result.latency_ms),
            "last_error": result.error,
        }
        if result.healthy:
            previous_ewma = previous.latency_ewma_ms
            sets["latency_ewma_ms"] = _num(
                result.latency_ms
                if previous_ewma is None
                else EWMA_ALPHA * result.latency_ms + (1 - EWMA_ALPHA) * previous_ewma
            )
            sets["consecutive_failures"] = 0
            if previous.circuit is CircuitState.OPEN:
                # It answers again: let one trial call decide whether to close.
                sets["circuit"] = CircuitState.HALF_OPEN.value
        else:
            sets["consecutive_failures"] = previous.consecutive_failures + 1
        names = {f"#{k}": k for k in sets}
        values: dict[str, Any] = {f":{k}": v for k, v in sets.items()}
        values[":seen"] = previous.circuit.value
        names["#circuit"] = "circuit"
        try:
            # Only if the circuit did not move since we read it (a dispatcher may open it).
            self._table.update_item(
                Key={"endpoint_id": result.endpoint_id},
                UpdateExpression="SET " + ", ".join(f"#{k} = :{k}" for k in sets),
                ConditionExpression="attribute_exists(endpoint_id) AND #circuit = :seen",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise

    # --- dispatch outcomes ------------------------------------------------------------------

    @raises_store_error("endpoints table")
    def record_dispatch_failure(self, endpoint_id: str, *, threshold: int, now: float) -> bool:
        """Count a failed GPU call at once; open the circuit at `threshold`. True if opened."""
        try:
            result = self._table.update_item(
                Key={"endpoint_id": endpoint_id},
                UpdateExpression="ADD consecutive_failures :one",
                ConditionExpression="attribute_exists(endpoint_id)",
                ExpressionAttributeValues={":one": 1},
                ReturnValues="ALL_NEW",
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        endpoint = Endpoint.model_validate(result["Attributes"])
        failed_trial = endpoint.circuit is CircuitState.HALF_OPEN
        if endpoint.circuit is CircuitState.OPEN or (
            endpoint.consecutive_failures < threshold and not failed_trial
        ):
            return False
        try:
            self._table.update_item(
                Key={"endpoint_id": endpoint_id},
                UpdateExpression="SET circuit = :open, opened_at = :now",
                ConditionExpression="attribute_exists(endpoint_id) AND circuit <> :open",
                ExpressionAttributeValues={":open": CircuitState.OPEN.value, ":now": _num(now)},
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        return True

    @raises_store_error("endpoints table")
    def record_dispatch_success(self, endpoint: Endpoint) -> None:
        """A call succeeded: reset the failure count and close a half-open circuit."""
        if endpoint.consecutive_failures == 0 and endpoint.circuit is CircuitState.CLOSED:
            return  # nothing to change: save the write on the hot path
        try:
            self._table.update_item(
                Key={"endpoint_id": endpoint.endpoint_id},
                UpdateExpression="SET consecutive_failures = :zero, circuit = :closed",
                ConditionExpression="attribute_exists(endpoint_id) AND circuit <> :open",
                ExpressionAttributeValues={
                    ":zero": 0,
                    ":closed": CircuitState.CLOSED.value,
                    ":open": CircuitState.OPEN.value,
                },
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise

    # pragma: no mutate end
    # --- slots ------------------------------------------------------------------------------

    def wait_with_priority(self, kind: TaskKind, task_id: str, *, until: float) -> None:
        """Announce a high-priority task waiting for a slot of `kind`, good until `until`."""
        self._table.put_item(
            Item={
                "endpoint_id": _waiter_key(kind, task_id),
                "row_type": WAITER_ROW,
                "kind": kind.value,
                "task_id": task_id,
                "until": _num(until),
            }
        )

    def stop_waiting(self, kind: TaskKind, task_id: str) -> None:
        self._table.delete_item(Key={"endpoint_id": _waiter_key(kind, task_id)})

    def take_slot(
        self, endpoint: Endpoint, slot: int, *, task_id: str, lease_seconds: float, now: float
    ) -> SlotLease | None:
        """Lease one slot if it is free (never taken, or its lease ended). None if not.

        An update, not a put: the slot row keeps its call-duration EWMA between leases, and
        the old image it returns tells the lease what that EWMA was.
        """
        return self._lease(
            SLOT_ROW,
            endpoint.kind,
            endpoint.endpoint_id,
            slot,
            task_id=task_id,
            lease_seconds=lease_seconds,
            now=now,
        )

    def take_priority_seat(
        self, kind: TaskKind, seat: int, *, task_id: str, lease_seconds: float, now: float
    ) -> SlotLease | None:
        """Lease one of the high-priority lane's seats if it is free. None if not.
        `release_slot` gives it back."""
        return self._lease(
            SEAT_ROW,
            kind,
            priority_lane_id(kind),
            seat,
            task_id=task_id,
            lease_seconds=lease_seconds,
            now=now,
        )

    def _lease(
        self,
        row_type: str,
        kind: TaskKind,
        owner: str,
        slot: int,
        *,
        task_id: str,
        lease_seconds: float,
        now: float,
    ) -> SlotLease | None:
        lease_id = str(uuid.uuid4())
        try:
            result = self._table.update_item(
                Key={"endpoint_id": _slot_key(owner, slot)},
                UpdateExpression=(
                    "SET row_type = :row_type, kind = :kind, slot_of = :of, slot = :slot, "
                    "lease_id = :lease, task_id = :task, lease_until = :until, leased_at = :now "
                    "REMOVE kept"
                ),
                # <= : a lease ending exactly now is over, as SlotLease.is_live says.
                ConditionExpression="attribute_not_exists(lease_until) OR lease_until <= :now",
                ExpressionAttributeValues={
                    ":row_type": row_type,
                    ":kind": kind.value,
                    ":of": owner,
                    ":slot": slot,
                    ":lease": lease_id,
                    ":task": task_id,
                    ":until": _num(now + lease_seconds),
                    ":now": _num(now),
                },
                ReturnValues="ALL_OLD",
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return None
            raise
        previous = result.get("Attributes", {}).get("call_seconds_ewma")
        return SlotLease(
            endpoint_id=owner,
            slot=slot,
            lease_id=lease_id,
            task_id=task_id,
            lease_until=float(_num(now + lease_seconds)),
            leased_at=float(_num(now)),
            call_seconds_ewma=None if previous is None else float(str(previous)),
        )

    def renew_slot(
        self,
        lease: SlotLease,
        *,
        task_id: str,
        lease_seconds: float,
        now: float,
        call_seconds: float | None = None,
    ) -> SlotLease | None:
        """Keep a held slot for its holder's next tasks, in one write: the lease, still ours
        and live, now names that task, starts now (`kept`: calls back to back from here) and
        ends `lease_seconds` from now; the finished call's duration is folded into the slot's
        EWMA as `release_slot` does. None if the lease was lost (it lapsed, or another holder
        has the slot): take a slot afresh then."""
        ewma = _ewma(lease.call_seconds_ewma, call_seconds)
        sets = "SET task_id = :task, lease_until = :until, leased_at = :now, kept = :kept"
        values: dict[str, Any] = {
            ":mine": lease.lease_id,
            ":task": task_id,
            ":until": _num(now + lease_seconds),
            ":now": _num(now),
            ":kept": True,
        }
        if ewma is not None and call_seconds is not None:
            sets += ", call_seconds_ewma = :ewma"
            values[":ewma"] = _num(ewma)
        try:
            self._table.update_item(
                Key={"endpoint_id": _slot_key(lease.endpoint_id, lease.slot)},
                UpdateExpression=sets,
                ConditionExpression="lease_id = :mine AND lease_until > :now",
                ExpressionAttributeValues=values,
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return None
            raise
        return lease.model_copy(
            update={
                "task_id": task_id,
                "lease_until": float(_num(now + lease_seconds)),
                "leased_at": float(_num(now)),
                "call_seconds_ewma": None if ewma is None else float(_num(ewma)),  # as stored
                "kept": True,
            }
        )

    @raises_store_error("endpoints table")
    def extend_lease(self, lease: SlotLease, *, until: float, now: float) -> bool:
        """Hold a live lease of ours until `until` (a callback-mode call: the slot stays
        taken while the GPU works and nobody waits on it). False if it is not ours."""
        try:
            self._table.update_item(
                Key={"endpoint_id": _slot_key(lease.endpoint_id, lease.slot)},
                UpdateExpression="SET lease_until = :until",
                ConditionExpression="lease_id = :mine AND lease_until > :now",
                ExpressionAttributeValues={
                    ":mine": lease.lease_id,
                    ":until": _num(until),
                    ":now": _num(now),
                },
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        return True

    @raises_store_error("endpoints table")
    def cut_lease(self, lease: SlotLease, *, until: float) -> bool:
        """End a lease of ours sooner (never later): at `until`. False if it is not ours."""
        try:
            self._table.update_item(
                Key={"endpoint_id": _slot_key(lease.endpoint_id, lease.slot)},
                UpdateExpression="SET lease_until = :until",
                ConditionExpression="lease_id = :mine AND lease_until > :until",
                ExpressionAttributeValues={":mine": lease.lease_id, ":until": _num(until)},
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        return True

    @raises_store_error("endpoints table")
    def release_slot(self, lease: SlotLease, *, call_seconds: float | None = None) -> None:
        """Free the slot now, but only if the lease is still ours; fold a successful call's
        duration into the slot's EWMA (what the balancer reads as the endpoint's speed)."""
        sets = ""
        values: dict[str, Any] = {":mine": lease.lease_id}
        ewma = _ewma(lease.call_seconds_ewma, call_seconds)
        if ewma is not None and call_seconds is not None:
            sets = " SET call_seconds_ewma = :ewma"
            values[":ewma"] = _num(ewma)
        try:
            self._table.update_item(
                Key={"endpoint_id": _slot_key(lease.endpoint_id, lease.slot)},
                UpdateExpression="REMOVE lease_id, task_id, lease_until, leased_at, kept" + sets,
                ConditionExpression="lease_id = :mine",
                ExpressionAttributeValues=values,
            )
        except ClientError as error:
            if not is_conditional_failure(error):
                raise
