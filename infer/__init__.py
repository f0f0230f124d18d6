"""zoo.infer: recurrent generation, sampling, speculative decoding and continuous batching over
the state contract.

    from zoo.infer import generate
    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8, seed=0)
    engine = zoo.infer.Engine(model, max_batch=16)   # requests join and leave at any step
"""

from .engine import Engine, Request, TokenEvent
from .generate import GenerationResult, GenerationStats, Stream, decode_step, generate, stream
from .sampling import SamplingConfig, choose_tokens, probabilities
from .speculative import SpeculativeResult, SpeculativeStats, speculative_generate

__all__ = [
    "Engine", "GenerationResult", "GenerationStats", "SamplingConfig", "SpeculativeResult",
    "SpeculativeStats", "Stream", "choose_tokens", "decode_step", "generate", "probabilities",
    "Request", "TokenEvent", "speculative_generate", "stream",
]
