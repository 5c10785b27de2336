"""Fixtures for the gateway tests; the helpers live in web_helpers.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from servers import serve
from web_helpers import make_settings

from pipeline.job import Job
from web.app import create_app


@pytest.fixture
def start_server(redis_url) -> Iterator[Callable[..., str]]:
    """Return a function that serves create_app(...) and returns its base URL; servers stop after the test."""
    with contextlib.ExitStack() as stack:

        def start(start_job: Callable[[Job], None], **setting_overrides: Any) -> str:
            app = create_app(redis_url=redis_url, start_job=start_job, settings=make_settings(**setting_overrides))
            return stack.enter_context(serve(app))

        yield start
