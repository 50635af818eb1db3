"""The LLM layer every family uses: one request/response model, backends, cache, judges."""

from synth.llm.backends import (
    BACKENDS,
    SERVERS,
    EmbeddedBackend,
    OpenAICompatBackend,
    PoolingRewardBackend,
    VLLMBackend,
    embedded_model_path,
)
from synth.llm.cache import ResponseCache, cache_key
from synth.llm.client import LLMClient, LLMStats
from synth.llm.factory import client_from_spec, make_backend, probe_server
from synth.llm.judge import YES_NO, JudgeScore, judge, score_response
from synth.llm.structured import (
    InvalidSchemaError,
    check_schema,
    parse_structured,
    structured_failure,
)
from synth.llm.types import (
    BackendError,
    GenerationParams,
    LLMRequest,
    LLMResponse,
    Message,
    Sample,
    Usage,
)

__all__ = [
    "BACKENDS",
    "BackendError",
    "PoolingRewardBackend",
    "SERVERS",
    "client_from_spec",
    "EmbeddedBackend",
    "GenerationParams",
    "InvalidSchemaError",
    "JudgeScore",
    "LLMClient",
    "LLMRequest",
    "LLMResponse",
    "LLMStats",
    "Message",
    "OpenAICompatBackend",
    "ResponseCache",
    "Sample",
    "Usage",
    "VLLMBackend",
    "YES_NO",
    "cache_key",
    "check_schema",
    "structured_failure",
    "embedded_model_path",
    "judge",
    "make_backend",
    "parse_structured",
    "probe_server",
    "score_response",
]
