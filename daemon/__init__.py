"""The Mac Provider daemon: serves one machine's models to the pool over NATS."""

__version__ = "0.1.0"
