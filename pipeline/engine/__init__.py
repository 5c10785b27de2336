"""Continuous-batching inference engine with a paged KV cache and prefix caching."""

from pipeline.engine.config import EngineConfig
from pipeline.engine.engine import LLMEngine, RequestOutput
from pipeline.engine.service import EngineService, RequestHandle
from pipeline.engine.sequence import Sequence, SequenceStatus

__all__ = ["EngineConfig", "EngineService", "LLMEngine", "RequestHandle", "RequestOutput", "Sequence", "SequenceStatus"]
