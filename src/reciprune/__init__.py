"""reciprune: declarative recipes for pruning, quantizing and sparse fine-tuning LLMs."""

__version__ = "0.1.0"
