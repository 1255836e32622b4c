"""The gateway's queue on a real broker: RabbitMQ quorum queues with a dead-letter exchange.

With ``broker`` set in the gateway config, a closed study leaves the local spool for RabbitMQ:
the receiving gateway publishes the study (its instances and state, one persistent message,
with publisher confirms) and only then removes its local copy, so nothing acknowledged to the
modality is ever held in one place only. Workers on any machine (``hygeia gateway work``)
consume studies with manual acknowledgement: a study is acknowledged after its SR is stored at
the destination, or after an explicit failure record; a worker killed mid-study leaves the
message unacknowledged and the broker hands it to another worker. SR UIDs are derived from the
study, so a redelivered study sends the same SR again and the PACS keeps one copy.

A study that keeps failing (``delivery_limit`` deliveries, counted by the quorum queue) or fails
for good goes to the dead-letter queue, which ``hygeia gateway status`` lists and ``hygeia
gateway retry`` puts back. Client library: pika (one connection per thread).
"""
from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from hygeia.errors import HygeiaError

log = logging.getLogger(__name__)

DEAD_EXCHANGE_SUFFIX = ".dead"


@dataclass
class Delivery:
    """One study taken from the queue (acknowledge or reject it through :class:`BrokerQueue`)."""

    tag: int
    job_name: str
    payload: bytes
    deliveries: int  # how many times the broker has handed this study out before (0: the first)


def pack_job(job: Path) -> bytes:
    """A job folder (``instances/*.dcm``, ``state.json``) as an uncompressed tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(job.rglob("*")):
            if f.is_file():
                tar.add(f, arcname=str(f.relative_to(job)))
    return buf.getvalue()


def unpack_job(payload: bytes, dest: Path) -> Path:
    """Write a packed job into ``dest`` (created); only plain files inside it are accepted."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r") as tar:
        tar.extractall(dest, filter="data")
    return dest


class BrokerQueue:
    """A quorum queue of studies and its dead-letter queue on one RabbitMQ virtual host.

    Args:
        url: ``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS).
        queue: the work queue's name; the dead-letter exchange and queue are ``<queue>.dead``.
        delivery_limit: deliveries after which the quorum queue dead-letters a study.
    """

    def __init__(self, url: str, queue: str = "hygeia.studies", delivery_limit: int = 5) -> None:
        self.url, self.queue, self.delivery_limit = url, queue, int(delivery_limit)
        self.dead = queue + DEAD_EXCHANGE_SUFFIX
        self._conn: Any = None
        self._ch: Any = None

    # -- connection ------------------------------------------------------------------
    def channel(self) -> Any:
        import pika

        if self._ch is None or self._ch.is_closed:
            params = pika.URLParameters(self.url)
            params.heartbeat = 60
            params.blocked_connection_timeout = 60
            self._conn = pika.BlockingConnection(params)
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
            self._ch.basic_qos(prefetch_count=1)
            self._declare(self._ch)
        return self._ch

    def _declare(self, ch: Any) -> None:
        ch.exchange_declare(self.dead, exchange_type="fanout", durable=True)
        ch.queue_declare(self.dead, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(self.dead, self.dead)
        ch.queue_declare(self.queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": self.dead, "x-delivery-limit": self.delivery_limit})

    def close(self) -> None:
        try:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
        self._conn = self._ch = None

    # -- producing ---------------------------------------------------------------------
    def publish(self, job_name: str, payload: bytes, queue: str | None = None) -> None:
        """Publish one study persistently; returns once the broker confirmed it (raises otherwise)."""
        import pika

        self.channel().basic_publish(
            exchange="", routing_key=queue or self.queue, body=payload, mandatory=True,
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                            content_type="application/x-tar", headers={"job": job_name}))

    def publish_job(self, job: Path) -> None:
        self.publish(job.name, pack_job(job))

    # -- consuming ---------------------------------------------------------------------
    def get(self) -> Delivery | None:
        """The next study, unacknowledged (None when the queue is empty)."""
        method, props, body = self.channel().basic_get(self.queue, auto_ack=False)
        if method is None:
            return None
        headers = props.headers or {}
        return Delivery(method.delivery_tag, str(headers.get("job", f"study.{method.delivery_tag}")), body,
                        int(headers.get("x-delivery-count", 0) or 0))

    def ack(self, d: Delivery) -> None:
        self.channel().basic_ack(d.tag)

    def requeue(self, d: Delivery) -> None:
        """Hand the study back (the quorum queue counts the delivery; past the limit it is dead-lettered)."""
        self.channel().basic_nack(d.tag, requeue=True)

    def dead_letter(self, d: Delivery) -> None:
        """Give up on the study now: it goes to the dead-letter queue."""
        self.channel().basic_nack(d.tag, requeue=False)

    # -- dead letters ------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        ch = self.channel()
        return {"queued": ch.queue_declare(self.queue, passive=True).method.message_count,
                "dead_letters": ch.queue_declare(self.dead, passive=True).method.message_count}

    def dead_letters(self) -> Iterator[dict[str, Any]]:
        """The dead-lettered studies (job name, deliveries, reason), left in place."""
        ch = self.channel()
        seen = []
        try:
            while True:
                method, props, _ = ch.basic_get(self.dead, auto_ack=False)
                if method is None:
                    break
                seen.append(method.delivery_tag)
                h = props.headers or {}
                death = (h.get("x-death") or [{}])[0]
                yield {"job": str(h.get("job", "")), "reason": str(death.get("reason", "")),
                       "deliveries": int(h.get("x-delivery-count", 0) or 0)}
        finally:
            for tag in seen:
                ch.basic_nack(tag, requeue=True)

    def retry_dead(self) -> int:
        """Move every dead-lettered study back to the work queue; returns how many."""
        ch = self.channel()
        moved = 0
        while True:
            method, props, body = ch.basic_get(self.dead, auto_ack=False)
            if method is None:
                return moved
            self.publish(str((props.headers or {}).get("job", "")), body)
            ch.basic_ack(method.delivery_tag)
            moved += 1


def describe(url: str) -> str:
    """``url`` without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


class BrokerError(HygeiaError):
    """The broker could not be reached or refused an operation (one line, no password)."""


def status(url: str, queue: str, delivery_limit: int) -> dict[str, Any]:
    """Counts and dead letters of the broker queue (what ``hygeia gateway status`` prints)."""
    q = BrokerQueue(url, queue, delivery_limit)
    try:
        return {"broker": describe(url), **q.counts(), "dead": list(q.dead_letters())}
    except HygeiaError:
        raise
    except Exception as exc:  # pika's connection and channel errors
        raise BrokerError(f"broker {describe(url)}: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        q.close()


