"""Retrieval stage: nearest chunks from pgvector, injected into the system prompt."""

from __future__ import annotations

from dataclasses import asdict

import psycopg
from celery import signals
from pgvector.psycopg import register_vector

from pipeline.embeddings import get_embedder
from pipeline.job import Job
from pipeline.retrieval import inject_passages, search
from pipeline.settings import get_settings
from workers.app import app, task_name
from workers.intent import last_user_text
from workers.runtime import Next, run_stage, serves_stage


def retrieve(job: Job) -> Next:
    settings = get_settings()
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        register_vector(conn)
        passages = search(conn, get_embedder(), last_user_text(job), top_k=settings.retrieval_top_k)
    job.passages = [asdict(p) for p in passages]
    job.messages = inject_passages(job.messages, passages)
    return Next("inference", job)


@app.task(name=task_name("retrieval"))
def retrieval_task(message: dict) -> None:
    run_stage("retrieval", message, retrieve)


@signals.worker_init.connect
def _load_embedder_at_start(**_kwargs) -> None:
    if serves_stage("retrieval"):
        get_embedder()
