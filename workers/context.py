"""Context stage: trim the conversation to the token budget."""

from __future__ import annotations

from celery import signals

from pipeline.context import trim_messages
from pipeline.job import Job
from pipeline.prompt import count_prompt_tokens
from pipeline.settings import get_settings
from workers.app import app, task_name
from workers.models import counting_model, tokenizer_for
from workers.runtime import Next, run_stage, serves_stage


def trim(job: Job) -> Next:
    tokenizer = tokenizer_for(counting_model(job))
    result = trim_messages(
        job.messages,
        lambda messages: count_prompt_tokens(tokenizer, messages),
        get_settings().context_budget_tokens,
    )
    job.messages = result.messages
    job.num_context_tokens = result.num_tokens
    job.num_dropped_messages = result.num_dropped
    return Next("intent", job)


@app.task(name=task_name("context"))
def context_task(message: dict) -> None:
    run_stage("context", message, trim)


@signals.worker_init.connect
def _load_tokenizers_at_start(**_kwargs) -> None:
    # Loading at start keeps the first job's context stage from paying for it.
    if serves_stage("context"):
        for model in set(get_settings().route_models.values()):
            tokenizer_for(model)
