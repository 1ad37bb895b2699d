"""`just bench`: the gateway's own overhead, measured side by side with its baseline.

The same streamed chat requests run two ways against the synthetic engine
(`MP_ENGINE=synthetic`, a deterministic stand-in that is NOT a model):

* direct      -- `SyntheticEngine.generate()` called in the benchmark process
                 (no HTTP, no NATS): the baseline;
* via gateway -- HTTP POST /v1/chat/completions with `stream: true` through the
                 real control plane, NATS and a real provider daemon.

Run with `python3 -m tests.bench --help`. Nothing here is named test_*.py, so
pytest never collects the benchmark.
"""
