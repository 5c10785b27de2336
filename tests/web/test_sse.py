"""JobEventFollower against the real Redis, and SSE encoding."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from pipeline.events import EventPublisher, log_key, seq_key
from pipeline.job import new_id
from web.sse import JobEventFollower, encode_comment, encode_event

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def async_client(redis_url):
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_overlapping_log_and_live_once(async_client, redis_client):
    """Events present both in the log read and in the subscription buffer must be yielded once."""
    job_id = new_id("job")
    publisher = EventPublisher(redis_client)

    async with JobEventFollower(async_client, redis_client, job_id) as follower:
        for text in ("a", "b", "c"):
            publisher.publish(job_id, "delta", text=text)
        await follower.catch_up()
        publisher.publish(job_id, "delta", text="d")
        publisher.publish(job_id, "finish", finish_reason="stop")

        events = []
        while not follower.is_finished:
            events.append(await follower.next_event(2.0))

    assert [(e["seq"], e["type"], e.get("text")) for e in events] == [
        (1, "delta", "a"), (2, "delta", "b"), (3, "delta", "c"), (4, "delta", "d"), (5, "finish", None),
    ]


async def test_subscription_live_after_subscribe(async_client, redis_client):
    """An event published right after subscribe() returns must reach the follower without a log read."""
    job_id = new_id("job")

    async with JobEventFollower(async_client, redis_client, job_id) as follower:
        EventPublisher(redis_client).publish(job_id, "delta", text="x")
        event = await follower.next_event(2.0)

    assert event == {"seq": 1, "type": "delta", "text": "x"}


async def test_gap_filled_from_log(async_client, redis_client):
    """A live event whose predecessor never arrived over pub/sub must be preceded by the missing event from the log."""
    job_id = new_id("job")

    async with JobEventFollower(async_client, redis_client, job_id) as follower:
        # Emulate a pub/sub loss: seq 1 reaches the log only.
        redis_client.set(seq_key(job_id), 1)
        redis_client.rpush(log_key(job_id), json.dumps({"seq": 1, "type": "delta", "text": "lost"}))
        EventPublisher(redis_client).publish(job_id, "delta", text="live")

        first = await follower.next_event(2.0)
        second = await follower.next_event(2.0)

    assert (first["seq"], first["text"]) == (1, "lost")
    assert (second["seq"], second["text"]) == (2, "live")


async def test_resume_point_skips_logged(async_client, redis_client):
    job_id = new_id("job")
    publisher = EventPublisher(redis_client)
    for text in ("a", "b", "c"):
        publisher.publish(job_id, "delta", text=text)

    async with JobEventFollower(async_client, redis_client, job_id, after_seq=2) as follower:
        logged = await follower.catch_up()
        event = await follower.next_event(0.5)
        nothing = await follower.next_event(0.2)

    assert [e["seq"] for e in logged] == [1, 2, 3]
    assert event["seq"] == 3
    assert nothing is None


def test_encode_event_lines():
    assert encode_event({"a": "é"}, 7) == 'id: 7\ndata: {"a":"é"}\n\n'
    assert encode_event("[DONE]") == "data: [DONE]\n\n"
    assert encode_event("two\nlines", 1) == "id: 1\ndata: two\ndata: lines\n\n"
    assert encode_comment("keep-alive") == ": keep-alive\n\n"
