"""Request validation of POST /v1/chat/completions over real HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
from servers import serve
from web_helpers import ScriptedJobs, chat_body, make_settings

from web.app import create_app

USER = [{"role": "user", "content": "hi"}]

# (case id, raw JSON body, param named in the error)
INVALID_BODIES = [
    ("temperature_negative", json.dumps(chat_body(temperature=-1)), "temperature"),
    ("temperature_nan", '{"model": "chatpipe", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    ("temperature_infinity", '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "temperature"),
    ("temperature_string", json.dumps(chat_body(temperature="0.5")), "temperature"),
    ("top_p_zero", json.dumps(chat_body(top_p=0)), "top_p"),
    ("top_p_above_one", json.dumps(chat_body(top_p=1.5)), "top_p"),
    ("top_k_below_minus_one", json.dumps(chat_body(top_k=-2)), "top_k"),
    ("min_p_above_one", json.dumps(chat_body(min_p=1.2)), "min_p"),
    ("repetition_penalty_zero", json.dumps(chat_body(repetition_penalty=0)), "repetition_penalty"),
    ("presence_penalty_above_two", json.dumps(chat_body(presence_penalty=3)), "presence_penalty"),
    ("frequency_penalty_below", json.dumps(chat_body(frequency_penalty=-2.5)), "frequency_penalty"),
    ("seed_negative", json.dumps(chat_body(seed=-1)), "seed"),
    ("n_two", json.dumps(chat_body(n=2)), "n"),
    ("n_bool", json.dumps(chat_body(n=True)), "n"),
    ("messages_missing", json.dumps({"model": "chatpipe"}), "messages"),
    ("messages_empty", json.dumps(chat_body(messages=[])), "messages"),
    ("messages_not_list", json.dumps(chat_body(messages="hi")), "messages"),
    ("message_not_object", json.dumps(chat_body(messages=["hi"])), "messages[0]"),
    ("role_unknown", json.dumps(chat_body(messages=[*USER, {"role": "robot", "content": "x"}])), "messages[1].role"),
    ("content_number", json.dumps(chat_body(messages=[{"role": "user", "content": 5}])), "messages[0].content"),
    ("content_missing", json.dumps(chat_body(messages=[{"role": "user"}])), "messages[0].content"),
    (
        "content_image_part",
        json.dumps(chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])),
        "messages[0].content[0]",
    ),
    ("max_tokens_zero", json.dumps(chat_body(max_tokens=0)), "max_tokens"),
    ("max_tokens_float", json.dumps(chat_body(max_tokens=1.5)), "max_tokens"),
    ("max_completion_tokens_negative", json.dumps(chat_body(max_completion_tokens=-3)), "max_completion_tokens"),
    ("stop_number", json.dumps(chat_body(stop=5)), "stop"),
    ("stop_five_strings", json.dumps(chat_body(stop=["a", "b", "c", "d", "e"])), "stop"),
    ("stop_empty_string", json.dumps(chat_body(stop="")), "stop"),
    ("stream_string", json.dumps(chat_body(stream="yes")), "stream"),
    ("stream_options_without_stream", json.dumps(chat_body(stream_options={"include_usage": True})), "stream_options"),
    ("include_usage_string", json.dumps(chat_body(stream=True, stream_options={"include_usage": "y"})), "stream_options.include_usage"),
    ("logprobs_string", json.dumps(chat_body(logprobs="true")), "logprobs"),
    ("top_logprobs_without_logprobs", json.dumps(chat_body(top_logprobs=3)), "top_logprobs"),
    ("top_logprobs_above_twenty", json.dumps(chat_body(logprobs=True, top_logprobs=21)), "top_logprobs"),
    ("model_unknown", json.dumps(chat_body(model="gpt-4o")), "model"),
    ("chatpipe_stages_string", json.dumps(chat_body(chatpipe_stages="yes")), "chatpipe_stages"),
    ("body_list", "[]", None),
    ("body_not_json", "{nope", None),
    ("body_empty", "", None),
]


@pytest.fixture(scope="module")
def jobs(redis_url) -> ScriptedJobs:
    return ScriptedJobs(redis_url)


@pytest.fixture(scope="module")
def base_url(redis_url, jobs):
    app = create_app(redis_url=redis_url, start_job=jobs, settings=make_settings())
    with serve(app) as url:
        yield url


@pytest.mark.parametrize("raw_body,param", [case[1:] for case in INVALID_BODIES], ids=[case[0] for case in INVALID_BODIES])
def test_invalid_body_rejected(base_url, jobs, raw_body, param):
    num_jobs_before = len(jobs.jobs)

    response = httpx.post(f"{base_url}/v1/chat/completions", content=raw_body, headers={"content-type": "application/json"})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert len(jobs.jobs) == num_jobs_before


def test_error_message_names_range(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(top_p=1.5))

    assert response.json()["error"]["message"] == "top_p=1.5 is invalid; allowed range is (0.0, 1.0]"


def test_role_error_lists_roles(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(messages=[{"role": "robot", "content": "x"}]))

    expected = "messages[0].role='robot' is invalid; use one of ['system', 'user', 'assistant', 'tool']"
    assert response.json()["error"]["message"] == expected


def test_body_over_limit_rejected(base_url):
    text = "x" * (4 * 1024 * 1024 + 1)

    response = httpx.post(f"{base_url}/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": text}]))

    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_valid_body_builds_job(base_url, jobs):
    body = chat_body(
        model="qwen2.5-coder-0.5b-instruct",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]},
        ],
        temperature=0,
        top_p=0.9,
        top_k=40,
        seed=7,
        max_completion_tokens=32,
        max_tokens=99,
        stop="END",
        logprobs=True,
        top_logprobs=2,
        user="someone",  # an OpenAI field chatpipe does not use: ignored
        unknown_extension={"x": 1},
    )

    response = httpx.post(f"{base_url}/v1/chat/completions", json=body)

    assert response.status_code == 200
    job = jobs.jobs[-1]
    assert response.headers["x-chatpipe-job-id"] == job.job_id
    assert job.requested_model == "qwen2.5-coder-0.5b-instruct"
    assert job.stream is False
    assert job.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "line one\nline two"},
    ]
    assert job.sampling.temperature == 0
    assert job.sampling.top_p == 0.9
    assert job.sampling.top_k == 40
    assert job.sampling.seed == 7
    assert job.sampling.max_tokens == 32
    assert job.sampling.stop == ["END"]
    assert job.sampling.logprobs is True
    assert job.sampling.top_logprobs == 2


def test_null_fields_use_defaults(base_url, jobs):
    body = chat_body(temperature=None, top_p=None, n=None, stop=None, stream=None, stream_options=None, max_tokens=None)

    response = httpx.post(f"{base_url}/v1/chat/completions", json=body)

    assert response.status_code == 200
    sampling = jobs.jobs[-1].sampling
    assert sampling.temperature == 1.0
    assert sampling.top_p == 1.0
    assert sampling.stop == []
    assert sampling.max_tokens is None
