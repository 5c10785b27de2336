"""A background thread that drives an LLMEngine, with thread-safe submit and abort.

Only the engine thread touches the engine's state. `submit` validates the
request in the caller's thread, so a bad request raises at once. The engine
thread adds queued requests before every step. If a step raises, the
engine is considered dead, and every pending handle and every later
`submit` get the error.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import structlog

from pipeline.engine.engine import LLMEngine, RequestOutput
from pipeline.job import SamplingParams

log = structlog.get_logger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped because a step raised; the cause is chained."""


class RequestHandle:
    """The future of one submitted request; `result` blocks until it finishes or is aborted."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._done = threading.Event()
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output

    def done(self) -> bool:
        return self._done.is_set()

    def _set_output(self, output: RequestOutput) -> None:
        self._output = output
        self._done.set()

    def _set_error(self, error: BaseException) -> None:
        self._error = error
        self._done.set()


class EngineService:
    def __init__(self, engine: LLMEngine,
                 on_step: Callable[[list[RequestOutput]], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._submissions: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._wakeup = threading.Event()
        self._is_stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chatpipe-engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
               arrival_time: float | None = None) -> RequestHandle:
        if self._error is not None:
            raise EngineDeadError("the engine thread has stopped after an error; restart the worker") from self._error
        if self._is_stopping:
            raise RuntimeError("the engine service is stopped; create a new EngineService")
        self.engine.validate_request(prompt_token_ids, sampling)

        handle = RequestHandle(request_id)
        self._submissions.put((handle, list(prompt_token_ids), sampling, arrival_time))
        self._wakeup.set()
        return handle

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wakeup.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread after its current step; unfinished handles get an error."""
        self._is_stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._is_stopping:
                self._add_submissions()
                if not self.engine.has_unfinished():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self._publish(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - every pending caller must learn that the engine died
            log.exception("engine_step_failed", num_pending=len(self._handles))
            self._error = exc
            self._fail_pending(EngineDeadError(f"the engine thread stopped: {exc!r}"), exc)
            return
        self._fail_pending(RuntimeError("the engine service stopped before this request finished"), None)

    def _add_submissions(self) -> None:
        while True:
            try:
                handle, prompt_token_ids, sampling, arrival_time = self._submissions.get_nowait()
            except queue.Empty:
                return
            try:
                self.engine.add_request(handle.request_id, prompt_token_ids, sampling, arrival_time)
            except ValueError as exc:
                handle._set_error(exc)
                continue
            self._handles[handle.request_id] = handle

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if self.on_step is not None and outputs:
            try:
                self.on_step(outputs)
            except Exception:  # noqa: BLE001 - a failing consumer must not stop the other requests
                log.exception("on_step_failed", request_ids=[o.request_id for o in outputs])
        for output in outputs:
            if output.finished:
                handle = self._handles.pop(output.request_id, None)
                if handle is not None:
                    handle._set_output(output)

    def _fail_pending(self, error: BaseException, cause: BaseException | None) -> None:
        error.__cause__ = cause
        for handle in self._handles.values():
            handle._set_error(error)
        self._handles.clear()
        while True:
            try:
                handle = self._submissions.get_nowait()[0]
            except queue.Empty:
                return
            handle._set_error(error)
