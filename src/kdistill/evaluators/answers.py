"""Answers to held-out prompts, scored against references and the teacher (being built)."""
