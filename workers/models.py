"""Model choice for counting and serving a job, and the per-process tokenizer cache."""

from __future__ import annotations

import functools

from pipeline.job import Job
from pipeline.models.loader import load_tokenizer
from pipeline.models.registry import MODELS
from pipeline.settings import get_settings


def requested_registered_model(job: Job) -> str | None:
    """Return the request's `model` when it names a registered model, else None (route decides)."""
    return job.requested_model if job.requested_model in MODELS else None


def counting_model(job: Job) -> str:
    """Model whose tokenizer counts the context.

    The context stage runs before intent picks the route. So it counts with
    the requested model when one is named, and otherwise with the chat
    route's model. Every registered model has a context far above the budget.
    """
    return job.target_model or requested_registered_model(job) or get_settings().route_models["chat"]


@functools.cache
def tokenizer_for(model: str):
    return load_tokenizer(model, get_settings().model_cache)
