"""The local OpenAI-compatible API."""
