"""The inference worker process and the daemon side that supervises it."""
