"""A thin, typed wrapper over the gpuqueue HTTP API (see the README's "The API")."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urljoin

import requests

TERMINAL_STATUSES = frozenset({"DONE", "FAILED", "CANCELED"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_MESSAGE = 500


class ApiError(Exception):
    """A non-2xx answer from the API (or from the presigned-URL host)."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(f"{status} {code or 'ERROR'}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: requests.Response) -> ApiError:
        code: str | None = None
        field: str | None = None
        message = ""
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            # Ours: {"error", "code", "field"?}; API Gateway's own: {"message": "Unauthorized"}.
            raw = body.get("error") or body.get("message")
            message = str(raw) if raw is not None else ""
            code = _str_or_none(body.get("code"))
            field = _str_or_none(body.get("field"))
        if not message:
            text = response.text.strip()
            message = text[:_MAX_MESSAGE] if text else (response.reason or "request failed")
        return cls(
            status=response.status_code,
            code=code,
            message=message,
            field=field,
            retry_after=_parse_retry_after(response.headers.get("Retry-After")),
        )


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _parse_retry_after(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        seconds = int(value.strip())
    except ValueError:
        return None  # an HTTP-date: the API never sends one
    return max(seconds, 0)


class GpuqueueClient:
    """One API endpoint, optionally one user's bearer token.

    `register` and `login` store the token they get on the client (`token`, `expires_at`).
    """

    def __init__(
        self,
        api_url: str,
        token: str | None = None,
        *,
        session: requests.Session | None = None,
        timeout: float = 30,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.expires_at: float | None = None
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout

    # -- auth -----------------------------------------------------------------------------

    def register(self, username: str, password: str) -> str:
        """Create the user and return its access token (201)."""
        return self._authenticate("/register", username, password)

    def login(self, username: str, password: str) -> str:
        """Return a fresh access token for an existing user."""
        return self._authenticate("/login", username, password)

    def _authenticate(self, path: str, username: str, password: str) -> str:
        body = self._json(
            self._request(
                "POST", path, json={"username": username, "password": password}, auth=False
            )
        )
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError(502, "BAD_RESPONSE", f"no token in the answer to {path}")
        expires_in = body.get("expires_in")
        self.token = token
        self.expires_at = (
            time.time() + float(expires_in) if isinstance(expires_in, int | float) else None
        )
        return token

    # -- tasks ----------------------------------------------------------------------------

    def submit_image(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Queue an image task; returns `{"task_id", "status", "message"}`."""
        payload: dict[str, Any] = {"prompt": prompt}
        optional = {
            "negative_prompt": negative_prompt,
            "width": width,
            "height": height,
            "steps": steps,
            "seed": seed,
        }
        payload.update({key: value for key, value in optional.items() if value is not None})
        return self._object(self._request("POST", "/api/v1/image/async", json=payload))

    def get_task(self, task_id: str) -> dict[str, Any]:
        return self._object(self._request("GET", f"/api/v1/tasks/{_segment(task_id)}"))

    def list_tasks(
        self, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the caller's tasks, newest first, and the next page's cursor."""
        params: dict[str, str | int] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        response = self._request("GET", "/api/v1/tasks", params=params)
        body = self._json(response)
        if not isinstance(body, list):
            raise ApiError(response.status_code, "BAD_RESPONSE", "expected a JSON array of tasks")
        tasks = [item for item in body if isinstance(item, dict)]
        return tasks, response.headers.get("X-Next-Cursor") or None

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._object(self._request("DELETE", f"/api/v1/tasks/{_segment(task_id)}"))

    def stats(self) -> dict[str, Any]:
        return self._object(self._request("GET", "/api/v1/system/stats"))

    def download_image(self, task_id: str) -> bytes:
        """The PNG of a DONE task: follow the API's 302 to the presigned URL, without auth."""
        response = self._request("GET", f"/api/images/{_segment(task_id)}", allow_redirects=False)
        if response.status_code not in _REDIRECTS:
            if response.ok and response.status_code < 300:
                return response.content  # a 2xx straight from the API: the image itself
            raise ApiError.from_response(response)
        location = response.headers.get("Location")
        if not location:
            raise ApiError(response.status_code, "BAD_RESPONSE", "redirect without a Location")
        # The presigned URL carries its own signature: a bearer token there is refused
        # (and must not leak to another host), so drop any session-level Authorization.
        image = self.session.get(
            urljoin(response.url or self.api_url + "/", location),
            headers={"Authorization": None},
            timeout=self.timeout,
        )
        if not image.ok:
            raise ApiError.from_response(image)
        return image.content

    def wait(
        self,
        task_id: str,
        *,
        timeout: float = 300,
        poll_interval: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the task until DONE, FAILED or CANCELED; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        interval = max(poll_interval, 0.0)
        while True:
            task = self.get_task(task_id)
            if on_update is not None:
                on_update(task)
            if task.get("status") in TERMINAL_STATUSES:
                return task
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"task {task_id} is still {task.get('status')} after {timeout:g} s"
                )
            time.sleep(min(interval, remaining))

    # -- GPU endpoints (operators: the Cognito group `admin`) -----------------------------

    def list_endpoints(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every GPU endpoint (of `kind`): configuration, health, in-flight calls."""
        params = {"kind": kind} if kind else None
        response = self._request("GET", "/api/v1/admin/endpoints", params=params)
        body = self._json(response)
        if not isinstance(body, list):
            raise ApiError(response.status_code, "BAD_RESPONSE", "expected a JSON array")
        return [item for item in body if isinstance(item, dict)]

    def put_endpoint(self, endpoint_id: str, **spec: Any) -> dict[str, Any]:
        """Add or replace an endpoint: `url`, `kind`, `protocol`, `capacity`, `weight`, `state`.

        Options left None are not sent, so the API's defaults apply to them.
        """
        body = {key: value for key, value in spec.items() if value is not None}
        path = f"/api/v1/admin/endpoints/{_segment(endpoint_id)}"
        return self._object(self._request("PUT", path, json=body))

    def drain_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """No new work for the endpoint; calls already running finish."""
        path = f"/api/v1/admin/endpoints/{_segment(endpoint_id)}/drain"
        return self._object(self._request("POST", path))

    def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        path = f"/api/v1/admin/endpoints/{_segment(endpoint_id)}"
        return self._object(self._request("DELETE", path))

    # -- plumbing -------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str | int] | None = None,
        allow_redirects: bool = True,
    ) -> requests.Response:
        headers = {"Accept": "application/json"}
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        response = self.session.request(
            method,
            self.api_url + path,
            headers=headers,
            json=json,
            params=params,
            timeout=self.timeout,
            allow_redirects=allow_redirects,
        )
        expected_redirect = not allow_redirects and response.status_code in _REDIRECTS
        if not (200 <= response.status_code < 300 or expected_redirect):
            raise ApiError.from_response(response)
        return response

    @staticmethod
    def _json(response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "BAD_RESPONSE", "the answer is not JSON") from exc

    @classmethod
    def _object(cls, response: requests.Response) -> dict[str, Any]:
        body = cls._json(response)
        if not isinstance(body, dict):
            raise ApiError(response.status_code, "BAD_RESPONSE", "expected a JSON object")
        return body


def _segment(value: str) -> str:
    return quote(value, safe="")
