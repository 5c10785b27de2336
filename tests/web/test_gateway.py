"""API keys and the per-client rate limit."""

from __future__ import annotations

import httpx
from web_helpers import ScriptedJobs, chat_body

from web.gateway import find_api_key, key_fingerprint

KEYS = ("sk-first-0123456789", "sk-second-abcdef")


def test_missing_key_401(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url), api_keys=KEYS)

    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), timeout=30)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_wrong_key_401(start_server, redis_url):
    jobs = ScriptedJobs(redis_url)
    base_url = start_server(jobs, api_keys=KEYS)

    for header in ("Bearer sk-first-012345678", "Basic sk-first-0123456789", "Bearer", "sk-first-0123456789"):
        response = httpx.get(f"{base_url}/v1/models", headers={"Authorization": header}, timeout=30)

        assert response.status_code == 401, header
    assert jobs.jobs == []


def test_valid_key_accepted(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url), api_keys=KEYS)

    response = httpx.post(
        f"{base_url}/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=30
    )

    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello, world!"


def test_page_and_health_need_no_key(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url), api_keys=KEYS)

    assert httpx.get(f"{base_url}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{base_url}/", timeout=30).status_code == 200


def test_rate_limit_429_retry_after(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url), api_keys=KEYS, rate_limit_per_min=2)
    first_key = {"Authorization": f"Bearer {KEYS[0]}"}
    second_key = {"Authorization": f"Bearer {KEYS[1]}"}

    statuses = [httpx.get(f"{base_url}/v1/models", headers=first_key, timeout=30).status_code for _ in range(2)]
    limited = httpx.get(f"{base_url}/v1/models", headers=first_key, timeout=30)
    other_key = httpx.get(f"{base_url}/v1/models", headers=second_key, timeout=30)

    assert statuses == [200, 200]
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert other_key.status_code == 200


def test_rate_limit_by_address_without_keys(start_server, redis_url, redis_client):
    base_url = start_server(ScriptedJobs(redis_url), rate_limit_per_min=1)
    for key in redis_client.scan_iter(match="chatpipe:ratelimit:addr:127.0.0.1:*"):
        redis_client.delete(key)

    first = httpx.get(f"{base_url}/v1/models", timeout=30)
    second = httpx.get(f"{base_url}/v1/models", timeout=30)

    assert first.status_code == 200
    assert second.status_code == 429


def test_rate_limit_key_hides_api_key(start_server, redis_url, redis_client):
    """The Redis counter key must carry a fingerprint of the API key, never the key itself."""
    base_url = start_server(ScriptedJobs(redis_url), api_keys=KEYS, rate_limit_per_min=100)

    httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30)

    keys = list(redis_client.scan_iter(match="chatpipe:ratelimit:*"))
    assert any(key_fingerprint(KEYS[0]) in key for key in keys)
    assert not any(KEYS[0] in key for key in keys)


def test_find_api_key_cases():
    assert find_api_key(f"Bearer {KEYS[0]}", KEYS) == KEYS[0]
    assert find_api_key(f"bearer {KEYS[1]}", KEYS) == KEYS[1]
    assert find_api_key("Bearer sk-unknown", KEYS) is None
    assert find_api_key(None, KEYS) is None
    assert find_api_key("Bearer ", KEYS) is None
