"""Status, list, cancel and image redirect: owner-only, seed shapes, 404 never 403."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import boto3
import pytest

from gpuqueue.models import EndpointProtocol, ImageRequest, TaskProgress, iso, utc_now
from gpuqueue.store.task_store import ProgressAck, TaskStore
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_local.standins.webhook_receiver import WebhookReceiver


def _status(h, user, task_id):
    return h.call("tasks_handler", "GET", "/api/v1/tasks", query={"task_id": task_id}, user=user)


def _get(h, user, task_id):
    return h.get_task(user, task_id)


def _list(h, user, **query):
    return h.call("tasks_handler", "GET", "/api/v1/tasks", query=query, user=user)


def _cancel(h, user, task_id):
    return h.call(
        "tasks_handler",
        "DELETE",
        f"/api/v1/tasks/{task_id}",
        route="/api/v1/tasks/{task_id}",
        path_params={"task_id": task_id},
        user=user,
    )


def _image(h, user, task_id):
    return h.call(
        "tasks_handler",
        "GET",
        f"/api/images/{task_id}",
        route="/api/images/{task_id}",
        path_params={"task_id": task_id},
        user=user,
    )


def test_seed_status_call_returns_the_task_in_the_seed_shape(make_stack, alice):
    h = make_stack()
    task_id = h.submit(alice, {"prompt": "A futuristic city"}).json()["task_id"]
    response = _status(h, alice, task_id)
    assert response.status == 200
    task = response.json()
    assert {"task_id", "user_id", "prompt", "status", "created_at", "updated_at"} <= set(task)
    assert task["task_id"] == task_id
    assert task["status"] == "QUEUED"
    assert task["created_at"].endswith("Z")
    assert task["result_url"] is None
    assert h.get_task(alice, task_id).json() == task


def test_list_is_newest_first_and_pages_with_a_cursor_header(make_stack, alice, bob):
    h = make_stack()
    ids = [h.submit(alice, {"prompt": f"p{i}"}).json()["task_id"] for i in range(5)]
    h.submit(bob, {"prompt": "bob's"})

    first = _list(h, alice, limit="2")
    assert first.status == 200
    assert [t["task_id"] for t in first.json()] == ids[::-1][:2]
    cursor = first.headers["x-next-cursor"]
    second = _list(h, alice, limit="2", cursor=cursor)
    assert [t["task_id"] for t in second.json()] == ids[::-1][2:4]
    third = _list(h, alice, limit="2", cursor=second.headers["x-next-cursor"])
    assert [t["task_id"] for t in third.json()] == ids[::-1][4:]
    everything = _list(h, alice)
    assert [t["task_id"] for t in everything.json()] == ids[::-1]
    assert all(t["user_id"] == alice.sub for t in everything.json())


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
    ],
)
def test_bad_list_parameters_are_400_naming_the_field(make_stack, alice, query, field):
    h = make_stack()
    response = _list(h, alice, **query)
    assert response.status == 400
    assert response.json()["field"] == field


def test_someone_elses_cursor_is_refused(make_stack, alice, bob):
    h = make_stack()
    for i in range(3):
        h.submit(alice, {"prompt": f"p{i}"})
    cursor = _list(h, alice, limit="1").headers["x-next-cursor"]
    response = _list(h, bob, limit="1", cursor=cursor)
    assert response.status == 400
    assert response.json()["field"] == "cursor"


def test_canceled_task_is_never_dispatched(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]

    canceled = _cancel(h, alice, task_id)
    assert canceled.status == 200
    assert canceled.json()["status"] == "CANCELED"
    h.drain()

    assert h.get_task(alice, task_id).json()["status"] == "CANCELED"
    assert h.image_servers[0].stats()["calls"] == 0


def test_cancel_of_a_finished_task_is_409(make_stack, alice):
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    response = _cancel(h, alice, task_id)
    assert response.status == 409
    assert "DONE" in response.json()["error"]
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def _running_on(h, alice, protocol: EndpointProtocol):
    """A task of alice's claimed by a worker on an endpoint speaking `protocol`."""
    store = TaskStore(boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")))
    task_id = h.submit(alice).json()["task_id"]
    claim = store.claim(
        store.get(task_id),  # type: ignore[arg-type]
        lease_seconds=60,
        now=time.time(),
        endpoint_id="gpu-a",
        endpoint_protocol=protocol,
    )
    assert claim is not None
    return store, claim


def test_cancel_of_a_running_task_is_accepted_and_its_view_says_so(make_stack, alice, bob):
    h = make_stack()
    store, claim = _running_on(h, alice, EndpointProtocol.A1111)
    task_id = claim.task.task_id

    assert _cancel(h, bob, task_id).status == 404  # not yours: as if it did not exist
    first = _cancel(h, alice, task_id)
    again = _cancel(h, alice, task_id)

    assert first.status == again.status == 202
    assert first.json()["status"] == "RUNNING"
    assert first.json()["cancel_requested"] is True
    assert _get(h, alice, task_id).json()["cancel_requested"] is True
    # Its worker learns it from its next progress write, and ends it.
    assert store.report_progress(claim, TaskProgress.of(2, 20)) is ProgressAck.CANCEL_REQUESTED
    assert store.cancel_running(claim)
    view = _get(h, alice, task_id).json()
    assert (view["status"], view["cancel_requested"], view["result_url"]) == (
        "CANCELED",
        False,
        None,
    )


def test_cancel_of_a_task_running_where_no_job_can_be_stopped_is_409_saying_so(make_stack, alice):
    h = make_stack()
    _, claim = _running_on(h, alice, EndpointProtocol.OPENAI)

    response = _cancel(h, alice, claim.task.task_id)

    assert response.status == 409
    assert "(openai) cannot stop a job it has started" in response.json()["error"]
    assert response.json()["field"] == "task_id"
    assert _get(h, alice, claim.task.task_id).json()["status"] == "RUNNING"


def test_image_of_an_unfinished_task_is_409(make_stack, alice):
    h = make_stack()
    task_id = h.submit(alice).json()["task_id"]
    response = _image(h, alice, task_id)
    assert response.status == 409
    assert "QUEUED" in response.json()["error"]


def test_an_image_past_its_retention_is_410_and_a_recent_one_redirects(make_stack, alice):
    h = make_stack(parameters={"ImageRetentionDays": "2"})
    h.run_checker()
    old, recent = (h.submit(alice).json()["task_id"] for _ in range(2))
    h.drain()
    table = boto3.resource("dynamodb").Table(h.stack.ref("TasksTable"))
    # Finished 2 days and a minute ago: the lifecycle rule may have deleted its image.
    finished = iso(utc_now() - timedelta(days=2, minutes=1))
    table.update_item(
        Key={"task_id": old},
        UpdateExpression="SET updated_at = :t",
        ExpressionAttributeValues={":t": finished},
    )

    gone = _image(h, alice, old)
    assert gone.status == 410
    assert gone.json()["code"] == "GONE"
    assert "2 days" in gone.json()["error"]
    assert _image(h, alice, recent).status == 302
    assert h.get_task(alice, old).json()["status"] == "DONE"  # the task itself is still kept


def test_another_users_task_is_404_everywhere(make_stack, alice, bob):
    # Given alice's finished task
    h = make_stack()
    h.run_checker()
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    assert _image(h, alice, task_id).status == 302

    # Then bob gets the same 404 as for an id that does not exist
    unknown = "00000000-0000-4000-8000-000000000000"
    for call in (_status, _get, _image, _cancel):
        mine = call(h, bob, task_id)
        missing = call(h, bob, unknown)
        assert mine.status == 404, call
        assert mine.json()["code"] == missing.json()["code"] == "NOT_FOUND"
        assert missing.status == 404
    assert [t["task_id"] for t in _list(h, bob).json()] == []
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


def _task_id_routes(h, *, signed_in: bool = True) -> list[tuple[str, str, str]]:
    """Every HTTP route of the template that names a task: (handler module, method, path);
    those behind the sign-in authorizer, or (`signed_in=False`) those outside it."""
    routes = []
    for logical_id in h.stack.functions():
        properties = h.stack.template["Resources"][logical_id]["Properties"]
        module = properties["Handler"].split(".")[0]
        for event in (properties.get("Events") or {}).values():
            path = event["Properties"].get("Path", "")
            public = event["Properties"].get("Auth", {}).get("Authorizer") == "NONE"
            if event["Type"] == "HttpApi" and "{task_id}" in path and public is not signed_in:
                routes.append((module, event["Properties"]["Method"], path))
    return routes


def test_every_route_naming_a_task_is_404_for_another_user(make_stack, alice, bob):
    # Given alice's finished task with a webhook log (a URL and attempts worth hiding)
    h = make_stack()
    h.run_checker()
    with WebhookReceiver() as receiver:
        _bob_is_404_on_every_route(h, alice, bob, f"{receiver.url}/alice-private")


def _bob_is_404_on_every_route(h, alice, bob, hook: str) -> None:
    task_id = h.submit(alice, {"prompt": "mine", "webhook_url": hook}).json()["task_id"]
    h.finish_and_notify()
    routes = _task_id_routes(h)
    # The template's list, not a hand-kept one: a new route is checked the day it is added.
    assert ("tasks_handler", "GET", "/api/v1/tasks/{task_id}/deliveries") in routes
    assert ("tasks_handler", "POST", "/api/v1/tasks/{task_id}/deliveries/redeliver") in routes
    alices = h.call(
        "tasks_handler",
        "GET",
        f"/api/v1/tasks/{task_id}/deliveries",
        route="/api/v1/tasks/{task_id}/deliveries",
        path_params={"task_id": task_id},
        user=alice,
    )
    assert alices.status == 200
    assert alices.json()["webhook_url"] == hook

    # Then bob, on every route, gets the answer of an id that does not exist
    for module, method, route in routes:
        answer = h.call(
            module,
            method,
            route.replace("{task_id}", task_id),
            route=route,
            path_params={"task_id": task_id},
            user=bob,
        )
        assert answer.status == 404, (method, route, answer.status)
        assert answer.json()["code"] == "NOT_FOUND", (method, route)
        assert hook not in json.dumps(answer.json())
    # The routes a GPU server calls back on (no sign-in: a per-attempt token) are 404 to
    # anyone without that token, whatever the task.
    unsigned = _task_id_routes(h, signed_in=False)
    assert ("gpu_callback_handler", "POST", "/api/v1/callbacks/cog/{task_id}") in unsigned
    for module, method, route in unsigned:
        for token in (None, "guessed"):
            answer = h.call(
                module,
                method,
                route.replace("{task_id}", task_id),
                route=route,
                path_params={"task_id": task_id},
                query=None if token is None else {"token": token},
                body={"id": f"{task_id}-a1", "status": "succeeded", "output": "data:,"},
            )
            assert answer.status == 404, (method, route, token, answer.status)
            assert hook not in json.dumps(answer.json())
    assert h.get_task(alice, task_id).json()["status"] == "DONE"


@pytest.mark.parametrize("bad_id", ["..%2F..%2Fetc%2Fpasswd", "a" * 65, "id with space", "x;drop"])
def test_malformed_task_ids_are_400_naming_the_field(make_stack, alice, bad_id):
    h = make_stack(endpoints=[ImageServerKnobs()])
    response = h.get_task(alice, bad_id)
    assert response.status == 400
    assert response.json()["field"] == "task_id"


def test_path_traversal_matches_no_route(make_stack, alice):
    h = make_stack()
    response = h.call(
        "tasks_handler", "GET", "/api/v1/tasks/../../etc/passwd", path_params={}, user=alice
    )
    assert response.status == 404
    assert response.json()["code"] == "NOT_FOUND"


def test_a_task_past_its_retention_is_gone_before_ttl_deletes_it(make_stack, alice):
    h = make_stack()
    store = TaskStore(
        boto3.resource("dynamodb").Table(h.stack.ref("TasksTable")), retention=timedelta(days=7)
    )
    old = store.create_image_task(
        alice.sub,
        ImageRequest(prompt="last week"),
        queue_ttl_seconds=3600,
        now=utc_now() - timedelta(days=8),
    )
    fresh = h.submit(alice).json()["task_id"]
    assert "task_id" in h.task_row(old.task_id)  # still in the table: TTL is lazy

    assert _get(h, alice, old.task_id).status == 404
    assert _status(h, alice, old.task_id).status == 404
    assert _image(h, alice, old.task_id).status == 404
    listed = [t["task_id"] for t in _list(h, alice).json()]
    assert listed == [fresh]
