"""shoal: an LLM inference server built for production."""

__version__ = "0.1.0"
