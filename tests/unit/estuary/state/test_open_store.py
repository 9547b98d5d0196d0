"""open_store: URL schemes, options and the errors that name what is wrong."""

from __future__ import annotations

import pytest

from estuary.state import InvalidStoreURL, MemoryStore, open_store, redact_url
from estuary.state.redis_store import RedisStore


def test_memory_urls() -> None:
    first, second = open_store("memory://"), open_store("memory://")
    assert isinstance(first, MemoryStore) and first is not second
    first.put("k", b"v")
    assert second.get("k") is None  # unnamed instances are private
    named = open_store("memory://sim-a")
    named.put("k", b"shared")
    again = open_store("memory://sim-a")
    assert again is named and again.url == "memory://sim-a"
    assert open_store("memory://sim-b").get("k") is None


@pytest.mark.parametrize(
    ("url", "options", "fragment"),
    [
        ("memory://x/path", {}, "no path"),
        ("memory://?a=1", {}, "no path or query"),
        ("memory://", {"prefix": "p"}, "takes no options"),
        ("postgres://host/0", {}, "scheme must be"),
        ("redis:///0", {}, "host is missing"),
        ("redis://h:6379/zero", {}, "database must be a number"),
        ("redis://h:99999/0", {}, "malformed"),
        ("redis://h/0?frobnicate=1", {}, "unknown option 'frobnicate'"),
        ("redis://h/0", {"frobnicate": 1}, "unknown option 'frobnicate'"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", {}, "TLS options need rediss"),
        ("redis://h/0?attempts=many", {}, "'attempts' must be a number"),
        ("redis://h/0?attempts=0", {}, "attempts must be an int >= 1"),
        ("redis://h/0?socket_timeout_s=-1", {}, "socket_timeout_s"),
        ("redis://h/0?prefix=a", {"prefix": "b"}, "given twice"),
        ("rediss://h/0?ssl_check_hostname=maybe", {}, "true or false"),
        ("rediss://h/0?ssl_certfile=/c.pem", {}, "given together"),
        ("redis://:pw@h/0", {"password": "x"}, "password given twice"),
        (42, {}, "must be a str"),
    ],
)
def test_invalid_urls_name_the_problem(url: str, options: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidStoreURL, match=fragment):
        open_store(url, **options)


def test_invalid_url_is_a_value_error_and_hides_the_password() -> None:
    with pytest.raises(ValueError) as info:
        open_store("redis://user:hunter2@h/notadb")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_redis_urls() -> None:
    store = open_store("redis://user:p%40ss@cache.internal:6380/3?prefix=fl:&attempts=5")
    assert isinstance(store, RedisStore)
    assert store.url == "redis://user:***@cache.internal:6380/3"
    assert store.prefix == "fl:"
    assert open_store("redis://localhost").url == "redis://localhost:6379/0"
    tls = open_store(
        "rediss://h:6390/0?ssl_ca_certs=/etc/ca.pem&ssl_check_hostname=false",
        ssl_certfile="/c.pem",
        ssl_keyfile="/k.pem",
        password="from-env",
    )
    assert tls.url == "rediss://:***@h:6390/0"
    assert "from-env" not in repr(tls.url)


def test_redact_url() -> None:
    assert redact_url("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("memory://") == "memory://"
