"""A real RabbitMQ broker (Debian package ``rabbitmq-server``) for integration tests.

:class:`RabbitMQ` starts one node with its own name, AMQP, distribution and epmd ports, data and
log folders, and a random Erlang cookie in a private HOME, as the current user
(``/usr/lib/rabbitmq/bin/rabbitmq-server``, not the Debian wrapper that switches user), waits
until AMQP answers, and stops the whole process group (epmd included) at the end.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from orthanc import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def available() -> bool:
    return Path(SERVER).is_file() and shutil.which("erl") is not None


class RabbitMQ:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        home = self.workdir / "home"
        for d in ("home", "mnesia", "log"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        return {**os.environ, "HOME": str(home), "RABBITMQ_NODENAME": f"hygeia{self.port}@localhost",
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port), "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq")}

    def start(self, timeout: float = 90.0) -> "RabbitMQ":
        import pika

        env = self.env()
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen([SERVER], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return self
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("rabbitmq-server did not answer in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        subprocess.run(["pkill", "-f", "--", f"-home {self.workdir / 'home'}"], check=False)  # the node, if orphaned
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        subprocess.run([epmd, "-kill"], env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
                       capture_output=True, check=False)
