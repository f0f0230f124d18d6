"""zoo.infer: recurrent generation, sampling and speculative decoding over the state contract.

    from zoo.infer import generate
    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8, seed=0)
"""

from .generate import GenerationResult, GenerationStats, Stream, decode_step, generate, stream
from .sampling import SamplingConfig, choose_tokens, probabilities
from .speculative import SpeculativeResult, SpeculativeStats, speculative_generate

__all__ = [
    "GenerationResult", "GenerationStats", "SamplingConfig", "SpeculativeResult",
    "SpeculativeStats", "Stream", "choose_tokens", "decode_step", "generate", "probabilities",
    "speculative_generate", "stream",
]
