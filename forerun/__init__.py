"""forerun: fast, exact speculative decoding and inference-time scaling for LLMs."""
from forerun.config import EngineConfig, SamplingParams, SpecConfig
from forerun.llm import LLM

__all__ = ["LLM", "EngineConfig", "SamplingParams", "SpecConfig"]
__version__ = "0.1.0"
