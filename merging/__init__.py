"""Merge a reasoning LLM's skills into a vision-language model's language model."""
