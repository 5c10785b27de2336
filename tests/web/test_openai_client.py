"""The official openai client against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import openai
import pytest
from web_helpers import ANSWER, SERVED_MODEL, ScriptedJobs


def client_for(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=30)


def test_openai_client_streaming(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url, is_synchronous=False, pause_s=0.01))
    client = client_for(base_url)

    stream = client.chat.completions.create(
        model="chatpipe", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == 15


def test_openai_client_streaming_with_stages(start_server, redis_url):
    """Stage chunks carry no choices, so a plain client must still assemble the exact text."""
    base_url = start_server(ScriptedJobs(redis_url))
    client = client_for(base_url)

    stream = client.chat.completions.create(
        model="chatpipe", messages=[{"role": "user", "content": "hi"}], stream=True, extra_body={"chatpipe_stages": True},
    )

    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWER


def test_openai_client_non_streaming(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url))
    client = client_for(base_url)

    completion = client.chat.completions.create(model="chatpipe", messages=[{"role": "user", "content": "hi"}])

    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == SERVED_MODEL
    assert completion.usage.prompt_tokens == 12


def test_openai_client_errors(start_server, redis_url):
    base_url = start_server(ScriptedJobs(redis_url), api_keys=("sk-right",))

    with pytest.raises(openai.AuthenticationError):
        client_for(base_url, "sk-wrong").models.list()
    with pytest.raises(openai.BadRequestError) as excinfo:
        client_for(base_url, "sk-right").chat.completions.create(
            model="chatpipe", messages=[{"role": "user", "content": "hi"}], temperature=5,
        )
    assert excinfo.value.body["param"] == "temperature"
    assert [m.id for m in client_for(base_url, "sk-right").models.list()] == ["qwen2.5-coder-0.5b-instruct", "chatpipe"]
