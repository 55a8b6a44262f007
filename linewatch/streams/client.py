"""A redis-py client made from the line's ``[redis]`` settings.

Responses are bytes (``decode_responses=False``) everywhere in linewatch: heatmap
PNGs are binary, and :meth:`StreamRecord.from_fields` takes bytes or str alike.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse, urlunparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from linewatch.config import RedisConfig
from linewatch.errors import ConfigError


def redis_client(cfg: RedisConfig, url: str | None = None) -> redis.Redis:
    """A client for ``url`` (default ``cfg.url``) with the ACL user, password and TLS of ``cfg``.

    Commands fail fast (``cfg.socket_timeout_s``, ``cfg.retries`` short retries) so that
    the writer spools instead of stalling the line when Redis is away.
    """
    target = url or cfg.url
    if not target:
        raise ConfigError("redis.url is empty: set it, or let `linewatch run` start Redis")
    parsed = urlparse(target)
    if parsed.scheme not in ("redis", "rediss"):
        raise ConfigError(f"redis.url: expected redis:// or rediss://, got {target!r}")
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.socket_timeout_s,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), cfg.retries),
        "health_check_interval": 30,
        "client_name": "linewatch",
    }
    if cfg.username is not None:
        kwargs["username"] = cfg.username
    if cfg.password is not None:
        kwargs["password"] = cfg.password.get_secret_value()
    if cfg.tls or parsed.scheme == "rediss":
        # TLS is chosen by the scheme in redis-py's from_url; the files go to SSLConnection.
        target = urlunparse(parsed._replace(scheme="rediss"))
        kwargs["ssl_cert_reqs"] = "required"
        for key, path in (
            ("ssl_ca_certs", cfg.tls_ca_certs),
            ("ssl_certfile", cfg.tls_certfile),
            ("ssl_keyfile", cfg.tls_keyfile),
        ):
            if path is not None:
                kwargs[key] = str(path)
    client: redis.Redis = redis.Redis.from_url(target, **kwargs)
    return client
