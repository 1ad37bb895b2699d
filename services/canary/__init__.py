"""Canary checks: greedy prompts compared with a trusted provider's answers (a spot check, not attestation)."""
