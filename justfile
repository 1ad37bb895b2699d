# Mac Provider — local commands. `pip install -e '.[dev]'` installs `just` itself.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Start the whole local system (NATS, Postgres, control plane, one provider daemon).
up:
    mac-provider up

# Run the whole test suite (real NATS, real Postgres, real mlx-lm models), one test file per parallel
# worker (each worker starts its own stack). `just test -m unit` runs the pure tests only.
test *ARGS:
    python3 -m pytest -n auto --maxprocesses 4 --dist loadfile {{ARGS}}

# Schemathesis against the OpenAPI document with every check, far bigger than in `just test`.
fuzz EXAMPLES="200" PHASES="examples,coverage,fuzzing,stateful":
    MP_FUZZ_EXAMPLES={{EXAMPLES}} MP_FUZZ_PHASES={{PHASES}} python3 -m pytest tests/test_openapi.py -k schemathesis -s

# Lint and type-check.
check:
    ruff check .
    ruff format --check .
    mypy

# Benchmarks, printed side by side with their baselines.
bench *ARGS:
    python3 -m tests.bench {{ARGS}}

# The deployment's offline checks: hadolint, Kubernetes schemas, checkov, nats-server -t (infra/deploy).
deploy-check:
    python3 -m pytest -q tests/test_deploy_image.py tests/test_deploy_manifests.py

# The control plane as deployed, on loopback: 3 NATS nodes, PostgreSQL, 3 gateway replicas behind Caddy,
# the other services once each, 3 daemons (synthetic engine by default; --model smollm2|PATH). Until Ctrl-C.
cluster *ARGS:
    python3 -m infra.cluster {{ARGS}}
