"""The model catalog: which weights may be served as which model id, and how each provider's models fare."""
