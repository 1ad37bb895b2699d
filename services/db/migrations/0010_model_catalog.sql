-- Verified models: which weights identities may be served under which public model id,
-- how every provider's models fare against that catalog, and canary checks.
--
-- A daemon reports, per model, the SHA-256 identity of its weights, config and tokenizer
-- files (daemon/models/identity.py). Gateways route a model id to a provider only when the
-- identity it reports is listed here for that id (an id with no entry at all: see
-- MP_UNCATALOGUED_MODELS). Canary prompts then spot-check that the provider really runs
-- those weights, against answers recorded from a pinned provider of the same identity.

CREATE TABLE model_catalog (
    -- A public model id, as buyers' requests may name one (schemas/limits.py).
    model_id        text NOT NULL
                    CHECK (length(model_id) BETWEEN 1 AND 256 AND model_id !~ '[[:space:][:cntrl:]*>]'),
    weights_sha256  text NOT NULL CHECK (weights_sha256 ~ '^[0-9a-f]{64}$'),
    -- Who listed it (the operator's login) and, through `admin models trust`, from which pinned provider.
    added_by        text NOT NULL CHECK (length(added_by) <= 256),
    source_provider text REFERENCES providers(provider_id) ON DELETE SET NULL,
    note            text NOT NULL DEFAULT '' CHECK (length(note) <= 1000),
    added_at        timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    revoked_by      text CHECK (length(revoked_by) <= 256),
    PRIMARY KEY (model_id, weights_sha256)
);

-- Every gateway replica caches the catalog and LISTENs here: an entry allowed or revoked,
-- whoever did it, changes routing everywhere at once.
CREATE FUNCTION notify_model_catalog_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row model_catalog;
    active boolean;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row := OLD;
        active := false;
    ELSE
        row := NEW;
        active := NEW.revoked_at IS NULL;
    END IF;
    PERFORM pg_notify(
        'mp_model_catalog_changed',
        json_build_object('model_id', row.model_id, 'weights_sha256', row.weights_sha256, 'active', active,
                          'deleted', TG_OP = 'DELETE')::text
    );
    RETURN row;
END;
$$;

CREATE TRIGGER model_catalog_changed
    AFTER INSERT OR UPDATE OF revoked_at OR DELETE ON model_catalog
    FOR EACH ROW EXECUTE FUNCTION notify_model_catalog_changed();

-- How the pool sees each model each provider reports (what `admin models list` shows the
-- operator and the provider's own pages will show its owner): written by gateways when it
-- changes, one row per (provider, model).
CREATE TABLE provider_models (
    provider_id     text NOT NULL REFERENCES providers(provider_id) ON DELETE CASCADE,
    model_id        text NOT NULL CHECK (length(model_id) BETWEEN 1 AND 256),
    weights_sha256  text NOT NULL DEFAULT '' CHECK (weights_sha256 ~ '^([0-9a-f]{64})?$'),
    -- verified, uncatalogued, not_in_catalog, hash_mismatch, hash_pending, canary_failed
    status          text NOT NULL CHECK (status ~ '^[a-z][a-z0-9_]{0,63}$'),
    routed          boolean NOT NULL,
    detail          text NOT NULL DEFAULT '' CHECK (length(detail) <= 1000),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_id, model_id)
);

-- Canary answers recorded from a pinned provider, per weights identity and canary prompt
-- (`prompt_key`: the SHA-256 of the prompt and its sampling parameters). The first answer
-- recorded stands; later canaries of every provider of that identity are compared with it.
CREATE TABLE canary_references (
    weights_sha256  text NOT NULL CHECK (weights_sha256 ~ '^[0-9a-f]{64}$'),
    prompt_key      text NOT NULL CHECK (prompt_key ~ '^[0-9a-f]{64}$'),
    token_ids       integer[] NOT NULL CHECK (cardinality(token_ids) BETWEEN 1 AND 256),
    -- Per token: its log-probability and its lead over the runner-up (NULL: not reported).
    logprobs        double precision[] CHECK (cardinality(logprobs) = cardinality(token_ids)),
    margins         double precision[] CHECK (cardinality(margins) = cardinality(token_ids)),
    finish_reason   text NOT NULL CHECK (finish_reason ~ '^[a-z_]{1,32}$'),
    provider_id     text NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (weights_sha256, prompt_key)
);

-- One row per canary run, for the operator (and the owner's page): never in the usage ledger.
CREATE TABLE canary_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider_id     text NOT NULL REFERENCES providers(provider_id) ON DELETE CASCADE,
    model_id        text NOT NULL CHECK (length(model_id) BETWEEN 1 AND 256),
    weights_sha256  text NOT NULL CHECK (weights_sha256 ~ '^[0-9a-f]{64}$'),
    prompt_key      text NOT NULL,
    request_id      text NOT NULL CHECK (length(request_id) <= 64),
    -- passed, failed, recorded (it became the reference), no_reference, unanswered
    result          text NOT NULL CHECK (result ~ '^[a-z_]{1,32}$'),
    detail          text NOT NULL DEFAULT '' CHECK (length(detail) <= 1000),
    tokens_compared integer NOT NULL DEFAULT 0 CHECK (tokens_compared >= 0),
    ttft_ms         double precision CHECK (ttft_ms >= 0),
    decode_tps      double precision CHECK (decode_tps >= 0),
    gateway_id      text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX canary_runs_provider_at_idx ON canary_runs (provider_id, at);

-- When each provider's next canary is due, and which replica holds it now (a lease, so one
-- replica at a time checks a given provider; a replica that dies loses it when it expires).
CREATE TABLE provider_canaries (
    provider_id     text PRIMARY KEY REFERENCES providers(provider_id) ON DELETE CASCADE,
    -- The daemon run (boot id and model identities) the schedule belongs to: a new one is due soon.
    seen_key        text NOT NULL DEFAULT '',
    next_at         timestamptz NOT NULL DEFAULT now(),
    lease_gateway   text,
    lease_until     timestamptz,
    last_run_at     timestamptz,
    last_result     text
);
CREATE INDEX provider_canaries_next_idx ON provider_canaries (next_at);
