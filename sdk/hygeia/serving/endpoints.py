"""Several Triton endpoints behind one connection: requests spread round-robin, failover on loss.

``connect("diagnoser", NAME, "host1:8001,host2:8001")`` builds an :class:`EndpointPool`: every call
goes to the next endpoint in turn; an endpoint that answers ``UNAVAILABLE`` (down, restarting,
unreachable) is set aside for ``cooldown`` seconds and the request is sent to the next one, so a
replica that dies mid-run costs no request as long as another one is up. Bad input and model
errors are not retried (another replica would answer the same).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Mapping, Sequence

from ..errors import InputError


class EndpointPool:
    """A :class:`~hygeia.serving.remote.Connection` look-alike over several ``HOST:PORT`` endpoints.

    Args:
        servers: the endpoints (``["h1:8001", "h2:8001"]`` or ``"h1:8001,h2:8001"``).
        cooldown: seconds an endpoint that failed with ``UNAVAILABLE`` is skipped.
        retries, backoff: rounds over all endpoints when every one is down, and the pause between.
        **opts: the other :class:`Connection` options (timeout, TLS, headers, token), for every endpoint.
    """

    def __init__(self, servers: str | Sequence[str], *, cooldown: float = 5.0, retries: int = 3,
                 backoff: float = 0.2, **opts: Any) -> None:
        from .connection import Connection

        names = [s.strip() for s in (servers.split(",") if isinstance(servers, str) else servers) if s.strip()]
        if not names:
            raise InputError("server", "one or more HOST:PORT endpoints, comma-separated", got=repr(servers))
        self.endpoints = [Connection(s, retries=0, backoff=backoff, **opts) for s in names]
        self.server = ",".join(names)
        self.url = self.server
        self.cooldown, self.retries, self.backoff = float(cooldown), int(retries), float(backoff)
        self.timeout = self.endpoints[0].timeout
        self.headers: dict[str, str] = self.endpoints[0].headers
        self._lock = threading.Lock()
        self._next = 0
        self._down_until = [0.0] * len(self.endpoints)

    def _order(self) -> list[int]:
        """Endpoint indices to try, starting at the next in turn; endpoints cooling down go last."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.endpoints)
            now = time.monotonic()
            order = [(start + i) % len(self.endpoints) for i in range(len(self.endpoints))]
            return [i for i in order if self._down_until[i] <= now] + [i for i in order if self._down_until[i] > now]

    def mark_down(self, index: int) -> None:
        with self._lock:
            self._down_until[index] = time.monotonic() + self.cooldown

    def call(self, model: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)`` on the next endpoint; on ``UNAVAILABLE`` try the others."""
        return self._spread(lambda e: e.call(model, fn))

    def infer(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str],
              parameters: Mapping[str, Any] | None = None) -> Any:
        """One inference request on the next endpoint (each endpoint with its own shared memory
        setting); on ``UNAVAILABLE`` on the others."""
        return self._spread(lambda e: e.infer(model, inputs, outputs, parameters))

    def _spread(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(connection)`` on the next endpoint; on ``UNAVAILABLE`` on the others, in rounds."""
        from .connection import ServerUnavailableError

        last: Exception | None = None
        for attempt in range(self.retries + 1):
            for i in self._order():
                try:
                    return fn(self.endpoints[i])
                except ServerUnavailableError as exc:
                    self.mark_down(i)
                    last = exc
            time.sleep(self.backoff * 2 ** attempt)
        assert last is not None
        raise last

    def client(self) -> Any:
        """A client of the next endpoint in turn (streams: the caller retries on another on failure)."""
        return self.endpoints[self._order()[0]].client()

    def model_config(self, model: str) -> dict[str, Any]:
        return self.call(model, lambda c: c.get_model_config(model, headers=self.headers, as_json=True,
                                                             client_timeout=self.timeout))["config"]

    def model_names(self, kind: str | None = None) -> list[str]:
        for i in self._order():
            names = self.endpoints[i].model_names(kind)
            if names:
                return names
        return []

    def describe(self) -> Mapping[str, Any]:
        """Endpoints and which are cooling down now (for logs and ``hygeia serve --check``)."""
        now = time.monotonic()
        return {e.server: {"cooling_down_s": max(0.0, round(t - now, 1))} for e, t in zip(self.endpoints, self._down_until)}
