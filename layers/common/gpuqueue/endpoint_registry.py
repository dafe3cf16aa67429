"""EndpointRegistry: the endpoints ("health") table the checker keeps and the dispatcher reads."""

from __future__ import annotations

import hashlib
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Key

from gpuqueue.models import Endpoint, EndpointProtocol, HealthResult, TaskKind

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

KIND_INDEX = "by-kind"
PARAMETER_SOURCE = "parameter"


def endpoint_id_for(kind: TaskKind, url: str) -> str:
    """Stable id for a declared URL, so redeploys and re-checks update the same row."""
    return f"{kind.value}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class EndpointRegistry:
    def __init__(self, table: Table) -> None:
        self._table = table

    def endpoints(self, kind: TaskKind) -> list[Endpoint]:
        items = []
        kwargs: dict[str, object] = {
            "IndexName": KIND_INDEX,
            "KeyConditionExpression": Key("kind").eq(kind.value),
        }
        while True:
            page = self._table.query(**kwargs)  # type: ignore[arg-type]
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return sorted((Endpoint.model_validate(i) for i in items), key=lambda e: e.endpoint_id)

    def routable(
        self, kind: TaskKind, *, max_age_seconds: float, now: float | None = None
    ) -> list[Endpoint]:
        now = time.time() if now is None else now
        return [e for e in self.endpoints(kind) if e.is_routable(now, max_age_seconds)]

    def sync_declared(self, kind: TaskKind, urls: list[str]) -> list[Endpoint]:
        """Upsert the endpoints a stack parameter declares; drop declared rows no longer listed.

        Health fields survive the upsert, so a redeploy does not mark a good endpoint unknown.
        """
        wanted = {endpoint_id_for(kind, url): url for url in urls}
        for endpoint_id, url in wanted.items():
            # Every attribute through a placeholder: several (url, capacity) are reserved words.
            keep_if_set = {
                "protocol": EndpointProtocol.OPENAI.value,
                "capacity": 1,
                "healthy": False,
                "consecutive_failures": 0,
            }
            always = {"url": url, "kind": kind.value, "source": PARAMETER_SOURCE}
            names = {f"#{k}": k for k in [*always, *keep_if_set]}
            values: dict[str, Any] = {f":{k}": v for k, v in {**always, **keep_if_set}.items()}
            sets = [f"#{k} = :{k}" for k in always]
            sets += [f"#{k} = if_not_exists(#{k}, :{k})" for k in keep_if_set]
            self._table.update_item(
                Key={"endpoint_id": endpoint_id},
                UpdateExpression="SET " + ", ".join(sets),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        for endpoint in self.endpoints(kind):
            if endpoint.source == PARAMETER_SOURCE and endpoint.endpoint_id not in wanted:
                self._table.delete_item(Key={"endpoint_id": endpoint.endpoint_id})
        return self.endpoints(kind)

    def record_health(self, result: HealthResult) -> None:
        failures = "#f = :zero" if result.healthy else "#f = if_not_exists(#f, :zero) + :one"
        expression = "SET #h = :h, #t = :t, #l = :l, #e = :e, " + failures
        names = {
            "#h": "healthy",
            "#t": "last_checked_at",
            "#l": "latency_ms",
            "#e": "last_error",
            "#f": "consecutive_failures",
        }
        values: dict[str, object] = {
            ":h": result.healthy,
            ":t": Decimal(str(round(result.checked_at, 3))),
            ":l": Decimal(str(round(result.latency_ms, 1))),
            ":e": result.error,
            ":zero": 0,
        }
        if not result.healthy:
            values[":one"] = 1
        # The row may have been removed while we probed: never resurrect it.
        try:
            self._table.update_item(
                Key={"endpoint_id": result.endpoint_id},
                UpdateExpression=expression,
                ConditionExpression="attribute_exists(endpoint_id)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,  # type: ignore[arg-type]
            )
        except self._table.meta.client.exceptions.ConditionalCheckFailedException:
            return
