"""The webhook function's HTTP side: a POST to the addresses the SSRF guard checked."""

from __future__ import annotations

import time
from collections.abc import Callable

import urllib3

from gpuqueue.notify.webhook_delivery import HttpAnswer
from gpuqueue.notify.webhook_target import WebhookTarget

REQUEST_TIMEOUT_SECONDS = 10.0


class PinnedPoster:
    """POST to the addresses the guard checked, never to a new resolution of the name: http
    connects to the address and sends the name in Host; https connects to the address with
    the name as SNI and verifies the certificate against the name. No redirects followed (a
    3xx counts as a failure: the receiver must answer at the URL it gave), no retries here
    (the queue retries), answers read no further than their status. An address that refuses
    the connection hands over to the next checked one within the same time budget."""

    def __init__(
        self,
        *,
        timeout: float = REQUEST_TIMEOUT_SECONDS,
        ca_certs: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import certifi  # noqa: PLC0415 - only the webhook function needs it

        self._timeout = timeout
        self._ca_certs = ca_certs or certifi.where()  # the bundle requests used
        self._clock = clock

    def pool(self, target: WebhookTarget, address: str) -> urllib3.HTTPConnectionPool:
        """A one-connection pool to `address`, speaking to the target's host name."""
        host = address.split("%", 1)[0]
        if target.scheme == "https":
            return urllib3.HTTPSConnectionPool(
                host,
                target.port,
                maxsize=1,
                retries=False,
                cert_reqs="CERT_REQUIRED",
                ca_certs=self._ca_certs,
                server_hostname=target.host,  # SNI
                assert_hostname=target.host,  # the certificate names the host, not the IP
            )
        return urllib3.HTTPConnectionPool(host, target.port, maxsize=1, retries=False)

    def post(self, target: WebhookTarget, body: bytes, headers: dict[str, str]) -> HttpAnswer:
        deadline = self._clock() + self._timeout
        sent = {**headers, "Host": target.host_header}
        error = "no address to connect to"
        for address in target.addresses:
            left = deadline - self._clock()
            if left <= 0:
                break
            with self.pool(target, address) as pool:
                try:
                    response = pool.urlopen(
                        "POST",
                        target.request_target,
                        body=body,
                        headers=sent,
                        redirect=False,
                        retries=False,
                        timeout=urllib3.Timeout(total=left),
                        preload_content=False,
                        assert_same_host=False,
                    )
                except urllib3.exceptions.NewConnectionError as failed:
                    error = f"{type(failed).__name__}: {failed}"
                    continue  # nothing was sent: the next checked address may answer
                except urllib3.exceptions.HTTPError as failed:
                    return HttpAnswer(status_code=None, error=f"{type(failed).__name__}: {failed}")
                status = int(response.status)
                response.close()
            if 200 <= status < 300:
                return HttpAnswer(status_code=status)
            return HttpAnswer(status_code=status, error=f"the receiver answered HTTP {status}")
        return HttpAnswer(status_code=None, error=error)
