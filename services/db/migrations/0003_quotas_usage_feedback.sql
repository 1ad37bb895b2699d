-- Quotas, the usage ledger and feedback.
--
-- Quota state is one row per quota subject ("a<account id>" for API keys,
-- "d<demo token id>" for browser demo tokens): the current UTC day's counters
-- plus requests in flight. A request takes its share with one conditional
-- UPDATE, so any number of gateway replicas share one truth without overshoot.

CREATE TABLE account_quotas (
    -- Operator overrides; NULL means "the default from settings".
    account_id        bigint PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    requests_per_day  integer CHECK (requests_per_day >= 0),
    tokens_per_day    bigint CHECK (tokens_per_day >= 0),
    concurrent        integer CHECK (concurrent >= 0),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE quota_usage (
    subject     text PRIMARY KEY,
    window_day  date NOT NULL,
    requests    integer NOT NULL DEFAULT 0,
    -- Settled tokens of the day plus what open reservations hold.
    tokens      bigint NOT NULL DEFAULT 0,
    inflight    integer NOT NULL DEFAULT 0 CHECK (inflight >= 0)
);

-- One row per request between its reservation and its settlement.
CREATE TABLE reservations (
    request_id         text PRIMARY KEY,
    subject            text NOT NULL,
    account_id         bigint,
    key_id             bigint,
    demo_token_id      text,
    model              text NOT NULL,
    window_day         date NOT NULL,
    tokens_reserved    bigint NOT NULL,
    gateway_id         text NOT NULL,
    provider_id        text,
    prompt_tokens      integer NOT NULL DEFAULT 0,
    completion_tokens  integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- Touched by the owning gateway while the request runs; a stale one belongs to a dead gateway.
    last_seen          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reservations_last_seen_idx ON reservations (last_seen);

-- The ledger: exactly one row per request id, whatever happened to it.
CREATE TABLE usage_ledger (
    request_id         text PRIMARY KEY,
    subject            text NOT NULL,
    account_id         bigint,
    key_id             bigint,
    demo_token_id      text,
    model              text NOT NULL,
    provider_id        text,
    prompt_tokens      integer NOT NULL DEFAULT 0,
    completion_tokens  integer NOT NULL DEFAULT 0,
    cached_tokens      integer NOT NULL DEFAULT 0,
    ttft_ms            real,
    duration_ms        real,
    -- ok | cancelled | failed | timeout | unavailable | gateway_lost
    outcome            text NOT NULL,
    billed             boolean NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_subject_time_idx ON usage_ledger (subject, created_at);

CREATE TABLE feedback (
    request_id  text PRIMARY KEY REFERENCES usage_ledger(request_id) ON DELETE CASCADE,
    rating      smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
    comment     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
