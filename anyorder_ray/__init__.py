"""anyorder-ray: Ray-distributed any-order masked training of LLM agents (LLaDA 2.0 on BabyAI)."""

__version__ = "0.1.0"
