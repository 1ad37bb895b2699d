"""What the benchmarks ask the model."""

from __future__ import annotations

# The synthetic load's one conversation (overhead and metering modes): the same both ways.
MESSAGES: tuple[tuple[str, str], ...] = (
    ("system", "You are a helpful assistant."),
    ("user", "Write a short story about a quick brown fox and a lazy dog."),
)

TOPICS = (
    "dragons",
    "the ocean",
    "photosynthesis",
    "Paris",
    "a lighthouse keeper",
    "volcanoes",
    "the moon",
    "bees",
    "a robot",
    "winter",
    "trains",
    "a library",
)


def numbered(n: int, ask: str) -> str:
    """A run's n-th prompt to a real model: `ask` about a topic. The number makes every prompt new, so that no
    prompt cache favours either side of a comparison."""
    return f"Request {n}: {ask} {TOPICS[n % len(TOPICS)]}."
