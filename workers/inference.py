"""Inference stage: one process keeps one model in memory and decodes many jobs at once.

The worker runs Celery's thread pool with as many threads as the engine
admits sequences. Each task thread renders and tokenizes its job, submits
it to the process's engine, and blocks until the sequence finishes; the
engine thread steps every running sequence together and, after each step,
sends the new token ids of all of them to the detokenize queue in one
message. Then the task thread decides where the job goes: a tool call goes
to the tools queue, anything else is finished by the detokenize stage.
"""

from __future__ import annotations

import json
import os
import threading
import time

import structlog
from celery import signals

from pipeline.job import Job
from pipeline.settings import get_settings
from workers.app import app, task_name
from workers.runtime import Next, redis_client, run_stage, worker_name

log = structlog.get_logger(__name__)

MODEL_ENV = "CHATPIPE_INFERENCE_MODEL"
STATS_INTERVAL_S = 1.0


class InferenceWorker:
    """The engine of this process plus the bookkeeping that maps engine requests to jobs."""

    def __init__(self, model_name: str) -> None:
        from pipeline.engine import EngineConfig, EngineService, LLMEngine
        from pipeline.models.loader import load_model

        settings = get_settings()
        self.model_name = model_name
        self.loaded = load_model(model_name, settings.model_cache, settings.device, settings.dtype,
                                 settings.weight_format)
        self.tokenizer = self.loaded.tokenizer
        config = EngineConfig(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            block_size=settings.kv_block_size,
            kv_cache_bytes=settings.kv_cache_bytes,
            native_kernels=settings.native_kernels,
        )
        self.engine = LLMEngine(self.loaded, config)
        self.service = EngineService(self.engine, on_step=self._on_step)
        # request_id -> detokenize routing info; removed when the request finishes
        self.requests: dict[str, dict] = {}
        self.lock = threading.Lock()
        log.info("inference_worker_ready", model=model_name, worker=worker_name(), **_config_summary(self.engine))

    def _on_step(self, outputs) -> None:
        items = []
        for out in outputs:
            with self.lock:
                # A finished request leaves the map here, after its last ids were taken.
                info = self.requests.pop(out.request_id, None) if out.finished else self.requests.get(out.request_id)
            if info is None or not out.new_token_ids:
                continue
            start = len(out.output_token_ids) - len(out.new_token_ids)
            items.append({**info, "start": start, "ids": list(out.new_token_ids), "logprobs": out.logprobs})
        if items:
            app.send_task(task_name("detokenize"), args=[{"kind": "tokens", "items": items}], queue="detokenize")

    def request_id(self, job: Job) -> str:
        return f"{job.job_id}:{job.tool_rounds}"

    def abort_job(self, job_id: str) -> None:
        with self.lock:
            matching = [rid for rid in self.requests if rid.split(":", 1)[0] == job_id]
        for rid in matching:
            self.service.abort(rid)


_worker: InferenceWorker | None = None


def _config_summary(engine) -> dict:
    stats = engine.stats()
    keys = ("num_total_blocks", "block_size", "kv_cache_bytes", "max_model_len", "weight_format", "native_kernels")
    return {k: stats[k] for k in keys if k in stats}


def get_worker() -> InferenceWorker:
    global _worker
    if _worker is None:
        model = os.environ.get(MODEL_ENV)
        if not model:
            raise RuntimeError(f"{MODEL_ENV} is not set; an inference worker serves exactly one model")
        _worker = InferenceWorker(model)
        _start_background_threads(_worker)
    return _worker


def _start_background_threads(worker: InferenceWorker) -> None:
    threading.Thread(target=_publish_stats, args=(worker,), name="engine-stats", daemon=True).start()
    threading.Thread(target=_listen_for_aborts, args=(worker,), name="abort-listener", daemon=True).start()


def _publish_stats(worker: InferenceWorker) -> None:
    key = f"chatpipe:engine_stats:{worker.model_name}:{worker_name()}"
    while True:
        try:
            stats = {**worker.engine.stats(), "model": worker.model_name, "worker": worker_name(),
                     "updated_at": time.time()}
            redis_client().set(key, json.dumps(stats), ex=10)
        except Exception:  # a Redis outage must not kill the worker; the next tick retries
            log.warning("engine_stats_publish_failed", exc_info=True)
        time.sleep(STATS_INTERVAL_S)


def _listen_for_aborts(worker: InferenceWorker) -> None:
    from pipeline.events import ABORT_CHANNEL

    while True:
        try:
            pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(ABORT_CHANNEL)
            for message in pubsub.listen():
                job_id = message["data"].decode() if isinstance(message["data"], bytes) else message["data"]
                worker.abort_job(job_id)
        except Exception:
            log.warning("abort_listener_reconnecting", exc_info=True)
            time.sleep(1.0)


@signals.worker_init.connect
def _load_model_at_start(**_kwargs) -> None:
    # Load before the worker takes tasks, so the first job does not wait for
    # the model and a missing model fails the worker at start.
    if os.environ.get(MODEL_ENV):
        get_worker()


def infer(job: Job) -> Next | None:
    from workers.inference_round import run_round

    return run_round(get_worker(), job)


@app.task(name=task_name("inference"))
def inference_task(message: dict) -> None:
    run_stage("inference", message, infer)
