"""The Celery app: broker settings, queues and task routes.

Every stage is its own queue, so each can be given its own worker
processes on any number of machines (`celery -A workers.app worker -Q NAME`).
Inference has one queue per model, because one worker process keeps one
model in memory.
"""

from __future__ import annotations

from celery import Celery

from pipeline.settings import get_settings

STAGE_QUEUES = ("context", "intent", "retrieval", "tools", "detokenize")
DEFAULT_BROKER_URL = "redis://127.0.0.1:6380/0"


def inference_queue(model: str) -> str:
    return f"inference.{model}"


def task_name(stage: str) -> str:
    return f"chatpipe.{stage}"


def _broker_url() -> str:
    return get_settings().redis_url or DEFAULT_BROKER_URL


app = Celery(
    "chatpipe",
    broker=_broker_url(),
    include=[
        "workers.context",
        "workers.intent",
        "workers.retrieval",
        "workers.inference",
        "workers.tools",
        "workers.detokenize",
    ],
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    # A message is acknowledged only after its stage finished, and a worker
    # that dies mid-task hands the message back, so a crash loses no job.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 3600},
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    task_default_queue="context",
)


def use_broker(url: str) -> None:
    """Point this process's sends at `url` (a command run outside `chatpipe up`'s environment)."""
    if app.conf.broker_url != url:
        app.conf.broker_url = url
        # Connections opened for the old URL are dropped; the pool is rebuilt on next use.
        if app._pool is not None:
            app._pool.force_close_all()
            app._pool = None
