"""The local admin API."""
