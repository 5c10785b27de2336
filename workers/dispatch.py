"""Sending jobs to stage queues, and starting a new job from the gateway."""

from __future__ import annotations

import secrets
import time

from pipeline.job import Job
from workers.app import app, inference_queue, task_name


def queue_for(stage: str, job: Job) -> str:
    if stage == "inference":
        if not job.target_model:
            raise ValueError(f"job {job.job_id} has no target_model; the intent stage sets it before inference")
        return inference_queue(job.target_model)
    return stage


def send(stage: str, job: Job) -> None:
    """Send the job message to the stage's queue."""
    job.sent_at = time.time()
    app.send_task(task_name(stage), args=[job.to_dict()], queue=queue_for(stage, job))


def start_job(job: Job) -> None:
    """Store a new job and send it to the first stage.

    A request without a seed gets one here, so that every stored job can be
    replayed to the same tokens.
    """
    from workers.runtime import store

    if job.sampling.seed is None:
        job.sampling.seed = secrets.randbelow(2**31)
    store().create_job(job)
    send("context", job)
