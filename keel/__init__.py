"""keel: serve open LLMs on your own machines behind the OpenAI HTTP API."""

from keel.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # Importing torch takes seconds; `import keel` for SamplingParams or the CLI help should not.
    if name == "LLM":
        from keel.llm import LLM
        return LLM
    raise AttributeError(name)
