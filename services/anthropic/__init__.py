"""Anthropic's Messages API: its requests as bus requests (convert), the answers in its format (output)."""
