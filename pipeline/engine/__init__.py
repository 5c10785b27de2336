"""Continuous-batching inference engine with a paged KV cache and prefix caching."""

from pipeline.engine.config import EngineConfig
from pipeline.engine.engine import ContextLengthExceededError, LLMEngine, RequestOutput
from pipeline.engine.service import EngineService, RequestHandle
from pipeline.engine.sequence import Sequence, SequenceStatus

__all__ = ["ContextLengthExceededError", "EngineConfig", "EngineService", "LLMEngine", "RequestHandle", "RequestOutput", "Sequence", "SequenceStatus"]
