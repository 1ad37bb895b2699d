-- GitHub sign-in, browser sessions, demo-token issuance limits, and revocation
-- notifications for the gateways' key caches.

-- One row per sign-in in flight. Only a hash of `state` is kept (the browser holds
-- the value); the PKCE verifier has to be kept as is, since it is sent to GitHub.
-- A row is deleted when used, so a state works once; it is refused after expires_at.
CREATE TABLE oauth_states (
    state_hash     bytea PRIMARY KEY,
    code_verifier  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);

CREATE INDEX oauth_states_expiry_idx ON oauth_states (expires_at);

-- Browser sessions after sign-in. The cookie holds a random token; only its hash is here.
CREATE TABLE sessions (
    token_hash  bytea PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

CREATE INDEX sessions_account_idx ON sessions (account_id);
CREATE INDEX sessions_expiry_idx ON sessions (expires_at);

-- Demo tokens issued per client IP in fixed windows, shared by every replica.
CREATE TABLE demo_issuance (
    client_ip     text NOT NULL,
    window_start  timestamptz NOT NULL,
    issued        integer NOT NULL,
    PRIMARY KEY (client_ip, window_start)
);

CREATE INDEX demo_issuance_window_idx ON demo_issuance (window_start);

-- Every gateway caches key lookups and LISTENs on this channel. The trigger fires
-- inside the revoking transaction, so the notice goes out exactly when the change
-- commits, whoever made it (the API, an operator's SQL, an account's deletion).
CREATE FUNCTION notify_api_key_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('mp_api_key_changed', OLD.id::text);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('mp_api_key_changed', NEW.id::text);
    RETURN NEW;
END;
$$;

CREATE TRIGGER api_keys_changed
    AFTER UPDATE OF key_hash, account_id, revoked_at OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION notify_api_key_changed();
