"""The one generation engine: used by GRPO rollouts, evaluation, chat and benchmarks."""

from pocketr1.engine.generate import Completion, SamplingParams, generate
from pocketr1.engine.sampling import sample_next

__all__ = ["Completion", "SamplingParams", "generate", "sample_next"]
