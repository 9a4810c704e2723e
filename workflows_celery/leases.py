"""Keeping held messages invisible on Redis for as long as they are held.

kombu's Redis transport gives a message that stays unacknowledged for longer
than the visibility timeout to another consumer, because it assumes the first
one died. Celery's usual advice is a timeout longer than the longest step and
the longest delay, which means a worker killed mid-step delays its messages by
that much. Instead, workflows-celery uses a short timeout (two minutes unless
``broker_transport_options["visibility_timeout"]`` says otherwise) and renews
the lease of every message a consumer holds (running, waiting for its ETA, or
waiting for an ack) every quarter of that timeout. A message comes back only
when its holder stopped renewing it, that is, when the holder is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from celery import Celery

logger = logging.getLogger(__name__)

#: Visibility timeout set on Redis brokers when the app sets none, in seconds.
DEFAULT_VISIBILITY_TIMEOUT_S = 120.0

#: Share of the visibility timeout between two renewals.
RENEWAL_SHARE = 0.25


def uses_redis(app: Celery) -> bool:
    """Tell whether ``app``'s broker is Redis."""
    url = str(app.conf.broker_url or "")
    return url.startswith(("redis://", "rediss://", "redis+socket://", "sentinel://"))


def set_default_visibility_timeout(app: Celery) -> None:
    """Give a Redis app the short default visibility timeout, keeping any set one."""
    options = dict(app.conf.broker_transport_options or {})
    options.setdefault("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT_S)
    app.conf.broker_transport_options = options


def renewal_interval_s(app: Celery) -> float:
    """Return the seconds between two lease renewals for ``app``."""
    options = app.conf.broker_transport_options or {}
    timeout_s = float(options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT_S))
    return max(timeout_s * RENEWAL_SHARE, 0.5)


def held_delivery_tags(channel: Any) -> list[str]:
    """Return the delivery tags of the unacknowledged messages of a kombu channel."""
    # NOTE: kombu offers no public accessor; ``qos._delivered`` is the map of
    # unacknowledged messages of kombu's virtual transports (Redis among them).
    delivered = getattr(getattr(channel, "qos", None), "_delivered", None) or {}
    for _ in range(3):
        try:
            return [str(tag) for tag in list(delivered)]
        except RuntimeError:
            # The consumer's thread changed the map while it was copied.
            continue
    return []


def renew(connection: Any, tags: Iterable[str]) -> int:
    """Move the unacked-index entries of ``tags`` to now; return how many were renewed.

    Only entries still present are touched (``ZADD XX``), so an acked message
    is never brought back.
    """
    tags = list(tags)
    if not tags:
        return 0
    channel = connection.default_channel
    now = time.time()
    renewed = channel.client.zadd(
        channel.unacked_index_key, {tag: now for tag in tags}, xx=True, ch=True
    )
    logger.debug("Renewed the visibility of %d held messages", len(tags))
    return int(renewed or 0)
