"""Conversation data through Hugging Face datasets (being built)."""
