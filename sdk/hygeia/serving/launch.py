"""One-call serving: build a repository for some plugins and serve it; check a running server."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from .binary import TritonServerError
from .server import ModelState, TritonServer

log = logging.getLogger(__name__)


def check(server: str, timeout: float = 5.0, **opts: Any) -> tuple[bool, bool, list[ModelState]]:
    """(live, ready, model states) of the server at ``HOST:PORT`` (gRPC), via Triton's own endpoints."""
    from .remote import Connection

    conn = Connection(server, timeout=timeout, retries=0, **opts)
    c = conn.client()
    try:
        live, ready = bool(c.is_server_live()), bool(c.is_server_ready())
        index = c.get_model_repository_index(as_json=True, headers=conn.headers, client_timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        raise TritonServerError(f"cannot reach Triton at {server}: {exc}") from None
    states = [ModelState(m.get("name", "?"), m.get("version", ""), m.get("state", "UNKNOWN"), m.get("reason", ""))
              for m in index.get("models", [])]
    return live, ready, states


@contextlib.contextmanager
def serve_plugins(plugins: Sequence[str] | None = None, repo: str | os.PathLike[str] | None = None,
                  device: str = "cpu", **server_opts: Any) -> Iterator[TritonServer]:
    """Build a repository for ``plugins`` (names; None: every installed plugin) and serve it.

    ``repo`` defaults to a temporary folder, removed afterwards. For the demo, tests and scripts::

        with serve_plugins(["my-diagnoser"]) as server:
            connect("diagnoser", "my-diagnoser", server.grpc_url).diagnose(images)
    """
    from .repository import build_repository

    tmp = None if repo is not None else tempfile.mkdtemp(prefix="hygeia-triton-")
    path = Path(repo if repo is not None else tmp)  # type: ignore[arg-type]
    try:
        res = build_repository(path, names=plugins, device=device)  # type: ignore[arg-type]
        if not res.models:
            raise TritonServerError(f"no model could be built for {plugins or 'the installed plugins'}: {res.failed}")
        if res.failed:
            log.warning("left out of the Triton repository: %s", res.failed)
        with TritonServer(path, **server_opts) as server:
            yield server
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
