"""zoo: an alternative-architecture model zoo for efficient LLM inference research."""

__version__ = "0.1.0"
