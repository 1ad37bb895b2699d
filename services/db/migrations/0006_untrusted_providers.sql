-- Providers are untrusted input: counts are bounded in the database too, protocol
-- violations are recorded per provider, and one that keeps violating is suspended.

-- No count a gateway writes can be negative; whatever a provider claims, a row that
-- says otherwise is refused rather than stored.
ALTER TABLE usage_ledger
    ADD CONSTRAINT usage_ledger_counts_check
        CHECK (prompt_tokens >= 0 AND completion_tokens >= 0 AND cached_tokens >= 0
               AND cached_tokens <= prompt_tokens),
    ADD CONSTRAINT usage_ledger_times_check
        CHECK ((ttft_ms IS NULL OR ttft_ms >= 0) AND (duration_ms IS NULL OR duration_ms >= 0));
ALTER TABLE reservations
    ADD CONSTRAINT reservations_counts_check
        CHECK (tokens_reserved >= 0 AND prompt_tokens >= 0 AND completion_tokens >= 0);
ALTER TABLE quota_usage
    ADD CONSTRAINT quota_usage_counts_check CHECK (requests >= 0 AND tokens >= 0);

-- 'suspended': stopped automatically for repeated protocol violations (an operator
-- unsuspends); routed like 'banned' until then.
ALTER TABLE providers DROP CONSTRAINT providers_status_check;
ALTER TABLE providers ADD CONSTRAINT providers_status_check
    CHECK (status IN ('pending', 'provisional', 'pinned', 'banned', 'suspended'));
-- The most slots a gateway believes this provider's heartbeats claim (NULL: the default cap).
ALTER TABLE providers ADD COLUMN max_slots integer CHECK (max_slots BETWEEN 0 AND 4096);
ALTER TABLE providers ADD COLUMN violations bigint NOT NULL DEFAULT 0 CHECK (violations >= 0);
ALTER TABLE providers ADD COLUMN last_violation text;
ALTER TABLE providers ADD COLUMN last_violation_at timestamptz;

-- One row per recorded violation (gateways coalesce floods before writing), for the operator.
CREATE TABLE provider_violations (
    id           bigserial PRIMARY KEY,
    provider_id  text NOT NULL REFERENCES providers(provider_id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind ~ '^[a-z_]{1,64}$'),
    detail       text NOT NULL DEFAULT '' CHECK (length(detail) <= 1000),
    request_id   text CHECK (length(request_id) <= 64),
    -- How many occurrences this row stands for (a flood is written once per interval).
    occurrences  integer NOT NULL DEFAULT 1 CHECK (occurrences >= 1),
    gateway_id   text NOT NULL,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_violations_provider_at_idx ON provider_violations (provider_id, at);

-- The notice now carries the slot cap too, so every replica applies an operator's change at once.
CREATE OR REPLACE FUNCTION notify_provider_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row providers;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row := OLD;
        row.status := 'pending';
        row.draining := false;
        row.max_slots := NULL;
    ELSE
        row := NEW;
        IF TG_OP = 'INSERT' AND NEW.status = 'pending' AND NOT NEW.draining AND NEW.max_slots IS NULL THEN
            RETURN NEW;
        END IF;
    END IF;
    PERFORM pg_notify(
        'mp_provider_changed',
        json_build_object('id', row.provider_id, 'status', row.status, 'draining', row.draining,
                          'max_slots', row.max_slots)::text
    );
    RETURN row;
END;
$$;

DROP TRIGGER providers_changed ON providers;
CREATE TRIGGER providers_changed
    AFTER INSERT OR UPDATE OF status, draining, max_slots OR DELETE ON providers
    FOR EACH ROW EXECUTE FUNCTION notify_provider_changed();
