"""parts: individual LLM components as classifiers (Chang, Thomason & Jia, EMNLP 2024)."""

__version__ = "0.1.0"
