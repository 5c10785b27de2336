"""GET /metrics: engine gauges from Redis stats keys, and the gateway's own counters."""

from __future__ import annotations

import json

import httpx
from web_helpers import SERVED_MODEL, ScriptedJobs, chat_body

ENGINE_STATS = {
    "model": "smollm2-135m-instruct",
    "worker": "w1",
    "num_running": 3,
    "num_waiting": 2,
    "num_total_blocks": 512,
    "num_free_blocks": 400,
    "block_size": 16,
    "kv_cache_bytes": 1048576,
    "cache_usage": 0.21875,
    "prefix_cache_hit_tokens_total": 96,
    "prompt_tokens_total": 1200,
    "generation_tokens_total": 345,
    "num_preempted_total": 1,
}


def test_engine_gauges_from_redis(start_server, redis_url, redis_client):
    key = "chatpipe:engine_stats:smollm2-135m-instruct:w1"
    redis_client.set(key, json.dumps(ENGINE_STATS), ex=10)
    base_url = start_server(ScriptedJobs(redis_url))

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    redis_client.delete(key)

    labels = '{model="smollm2-135m-instruct",worker="w1"}'
    assert f"chatpipe_engine_num_requests_running{labels} 3.0" in text
    assert f"chatpipe_engine_num_requests_waiting{labels} 2.0" in text
    assert f"chatpipe_engine_kv_cache_usage_ratio{labels} 0.21875" in text
    assert f"chatpipe_engine_num_free_blocks{labels} 400.0" in text
    assert f"chatpipe_engine_num_total_blocks{labels} 512.0" in text
    assert f"chatpipe_engine_prompt_tokens_total{labels} 1200.0" in text
    assert f"chatpipe_engine_generation_tokens_total{labels} 345.0" in text
    assert f"chatpipe_engine_prefix_cache_hit_tokens_total{labels} 96.0" in text
    assert f"chatpipe_engine_num_preemptions_total{labels} 1.0" in text
    assert "chatpipe_engine_stats_up 1.0" in text


def test_expired_stats_disappear(start_server, redis_url, redis_client):
    base_url = start_server(ScriptedJobs(redis_url))
    redis_client.set("chatpipe:engine_stats:m:gone", json.dumps({**ENGINE_STATS, "model": "m", "worker": "gone"}), px=50)
    redis_client.set("chatpipe:engine_stats:m:bad", "{not json", ex=10)

    import time

    time.sleep(0.2)
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    redis_client.delete("chatpipe:engine_stats:m:bad")

    assert 'worker="gone"' not in text
    assert 'worker="bad"' not in text


def test_finish_metrics_recorded(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url))
    httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(stream=True), timeout=30)
    httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(), timeout=30)
    httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(n=3), timeout=30)

    text = httpx.get(f"{base_url}/metrics", timeout=30).text

    model = f'model="{SERVED_MODEL}"'
    assert f"chatpipe_time_to_first_token_seconds_count{{{model}}} 2.0" in text
    # job_ttft_s (0.3 s) is observed, not the engine's ttft_s (0.05 s).
    assert f'chatpipe_time_to_first_token_seconds_bucket{{le="0.5",{model}}} 2.0' in text
    assert f'chatpipe_time_to_first_token_seconds_bucket{{le="0.25",{model}}} 0.0' in text
    assert f"chatpipe_inter_token_latency_seconds_sum{{{model}}} 0.1" in text
    assert f"chatpipe_prompt_tokens_total{{{model}}} 24.0" in text
    assert f"chatpipe_completion_tokens_total{{{model}}} 6.0" in text
    assert 'chatpipe_finished_jobs_total{finish_reason="stop"} 2.0' in text
    assert 'chatpipe_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'chatpipe_http_requests_total{method="POST",route="/v1/chat/completions",status="400"} 1.0' in text


def test_models_list(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url))

    body = httpx.get(f"{base_url}/v1/models", timeout=30).json()

    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["qwen2.5-coder-0.5b-instruct", "chatpipe"]
    assert {m["object"] for m in body["data"]} == {"model"}
