# Mac Provider — local commands. `pip install -e '.[dev]'` installs `just` itself.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Start the whole local system (NATS, Postgres, control plane, one provider daemon).
up:
    mac-provider up

# Run the whole test suite (real NATS, real Postgres, real mlx-lm models).
test *ARGS:
    python3 -m pytest {{ARGS}}

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
