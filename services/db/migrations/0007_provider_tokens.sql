-- Providers have owners and sign in with provider tokens (`mpp_`), not NATS users an
-- operator writes into the server's config. Only a SHA-256 of each token is stored.

-- The account that signed this Mac in (NULL: an operator made its token), and the Mac's name.
ALTER TABLE providers ADD COLUMN account_id bigint REFERENCES accounts(id) ON DELETE SET NULL;
ALTER TABLE providers ADD COLUMN name text NOT NULL DEFAULT ''
    CHECK (length(name) <= 64 AND name !~ '[[:cntrl:]]');
CREATE INDEX providers_account_idx ON providers (account_id) WHERE account_id IS NOT NULL;

CREATE TABLE provider_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider_id   text NOT NULL REFERENCES providers(provider_id) ON DELETE CASCADE,
    -- Who made it: the owner through device login, or NULL for the operator's CLI.
    account_id    bigint REFERENCES accounts(id) ON DELETE CASCADE,
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    -- The first characters of the token, so its owner can tell tokens apart.
    prefix        text NOT NULL CHECK (prefix ~ '^mpp_[0-9A-Za-z]{1,8}$'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX provider_tokens_provider_idx ON provider_tokens (provider_id);

-- Whoever revokes a token (the owner's page, the operator's CLI, SQL), every control-plane
-- replica hears it at once and closes that provider's NATS connections.
CREATE FUNCTION notify_provider_token_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.revoked_at IS NOT NULL AND OLD.revoked_at IS NULL THEN
        PERFORM pg_notify('mp_provider_token_revoked',
                          json_build_object('id', NEW.id, 'provider_id', NEW.provider_id)::text);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER provider_tokens_revoked
    AFTER UPDATE OF revoked_at ON provider_tokens
    FOR EACH ROW EXECUTE FUNCTION notify_provider_token_revoked();
