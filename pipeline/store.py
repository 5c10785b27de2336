"""Postgres storage of jobs and of the message each stage consumed.

One short-lived connection per call keeps the store safe to use from the
threads of a Celery worker; a stage makes a handful of calls per job, so
connection set-up is not on the token path.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipeline.job import Job


def _ts(epoch_s: float | None) -> datetime | None:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, tz=timezone.utc)


class JobStore:
    def __init__(self, database_url: str) -> None:
        self._url = database_url

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self._url, autocommit=True, row_factory=dict_row)

    def create_job(self, job: Job) -> None:
        """Insert the job row; a second insert of the same job id (a redelivered message) is a no-op."""
        with self._connect() as conn:
            conn.execute(
                """INSERT INTO jobs (job_id, request_id, conversation_id, requested_model, replay_of, created_at)
                   VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (job_id) DO NOTHING""",
                (job.job_id, job.request_id, job.conversation_id, job.requested_model, job.replay_of,
                 _ts(job.created_at)),
            )

    def start_stage(self, job_id: str, stage: str, message: dict[str, Any], worker: str,
                    queued_at: float | None = None) -> int:
        """Store the message a stage consumed; return the stage run id for `end_stage`."""
        with self._connect() as conn:
            row = conn.execute(
                """INSERT INTO stage_runs (job_id, stage, message, worker, queued_at, started_at)
                   VALUES (%s, %s, %s, %s, %s, now()) RETURNING id""",
                (job_id, stage, Jsonb(message), worker, _ts(queued_at)),
            ).fetchone()
            conn.execute("UPDATE jobs SET status = 'running' WHERE job_id = %s AND status = 'queued'", (job_id,))
        return row["id"]

    def end_stage(self, run_id: int, outcome: str, duration_ms: float) -> None:
        with self._connect() as conn:
            conn.execute(
                "UPDATE stage_runs SET finished_at = now(), duration_ms = %s, outcome = %s WHERE id = %s",
                (duration_ms, outcome, run_id),
            )

    def update_route(self, job_id: str, route: str, target_model: str | None) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE jobs SET route = %s, target_model = %s WHERE job_id = %s",
                         (route, target_model, job_id))

    def finish_job(self, job_id: str, status: str, *, finish_reason: str | None = None,
                   usage: dict | None = None, metrics: dict | None = None, error: str | None = None) -> None:
        with self._connect() as conn:
            conn.execute(
                """UPDATE jobs SET status = %s, finish_reason = %s, usage = %s, metrics = %s, error = %s,
                          finished_at = now() WHERE job_id = %s""",
                (status, finish_reason, Jsonb(usage or {}), Jsonb(metrics or {}), error, job_id),
            )

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self._connect() as conn:
            return conn.execute("SELECT * FROM jobs WHERE job_id = %s", (job_id,)).fetchone()

    def list_stage_runs(self, job_id: str) -> list[dict[str, Any]]:
        with self._connect() as conn:
            return conn.execute(
                """SELECT id, stage, worker, queued_at, started_at, finished_at, duration_ms, outcome
                   FROM stage_runs WHERE job_id = %s ORDER BY id""",
                (job_id,),
            ).fetchall()

    def get_stage_message(self, job_id: str, stage: str) -> dict[str, Any] | None:
        """Return the first message the stage consumed for this job (the start of the job's path there)."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT message FROM stage_runs WHERE job_id = %s AND stage = %s ORDER BY id LIMIT 1",
                (job_id, stage),
            ).fetchone()
        return None if row is None else row["message"]

    def recent_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        with self._connect() as conn:
            return conn.execute(
                """SELECT job_id, status, route, target_model, finish_reason, created_at, finished_at
                   FROM jobs ORDER BY created_at DESC LIMIT %s""",
                (limit,),
            ).fetchall()
