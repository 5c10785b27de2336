"""Intent stage: pick a route by embedding similarity; greetings get a rule reply here."""

from __future__ import annotations

import functools

from celery import signals

from pipeline.embeddings import get_embedder
from pipeline.intent import IntentRouter, greeting_reply
from pipeline.job import Job
from pipeline.settings import get_settings
from workers.app import app, task_name
from workers.models import requested_registered_model
from workers.runtime import Next, publisher, run_stage, serves_stage, store, zero_usage


@functools.cache
def router() -> IntentRouter:
    return IntentRouter(get_embedder())


def last_user_text(job: Job) -> str:
    for message in reversed(job.messages):
        if message.get("role") == "user":
            content = message.get("content") or ""
            return content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
    return ""


def answer_greeting(job: Job, language: str) -> None:
    reply = greeting_reply(last_user_text(job), language)
    usage = zero_usage()
    # Store first: a client that reads the job after the finish event must see it finished.
    store().finish_job(job.job_id, "finished", finish_reason="stop", usage=usage)
    events = publisher()
    events.publish(job.job_id, "delta", text=reply)
    events.publish(job.job_id, "finish", finish_reason="stop", usage=usage, metrics={}, route="greeting",
                   model="rule")


def route(job: Job) -> Next | None:
    decision = router().route(last_user_text(job))
    job.route = decision.route
    job.route_score = round(float(decision.score), 4)
    if decision.route == "greeting":
        store().update_route(job.job_id, job.route, None)
        answer_greeting(job, decision.language)
        return None

    job.target_model = requested_registered_model(job) or get_settings().route_models[decision.route]
    store().update_route(job.job_id, job.route, job.target_model)
    return Next("retrieval" if decision.route == "knowledge" else "inference", job)


@app.task(name=task_name("intent"))
def intent_task(message: dict) -> None:
    run_stage("intent", message, route)


@signals.worker_init.connect
def _load_router_at_start(**_kwargs) -> None:
    # The embedder takes seconds to load; the first greeting should not wait for it.
    if serves_stage("intent"):
        router()
