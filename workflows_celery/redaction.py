"""Masking of secrets in broker URLs before they are logged or printed."""

from __future__ import annotations

from kombu.utils.url import maybe_sanitize_url


def mask_url(url: object) -> str:
    """Return ``url`` with any password replaced by ``**``.

    Handles the ``;``-separated failover lists Celery accepts.
    """
    if url is None:
        return "<default>"
    text = str(url)
    return ";".join(str(maybe_sanitize_url(part.strip())) for part in text.split(";"))
