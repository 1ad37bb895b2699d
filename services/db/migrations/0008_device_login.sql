-- Device login for Mac owners (RFC 8628): `mac-provider-daemon login` asks for a device code,
-- the owner confirms its short user code in the browser, and the daemon's next poll gets a
-- provider token (`mpp_`, table provider_tokens), once.

CREATE TABLE device_authorizations (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Only a SHA-256 of the device code: the daemon holds the value, and it is worth a token.
    device_code_hash  bytea NOT NULL UNIQUE CHECK (length(device_code_hash) = 32),
    -- 8 letters of RFC 8628's base-20 alphabet (no vowels, nothing that looks alike), shown as
    -- XXXX-XXXX and stored without the dash. Unique over every row kept, live or not.
    user_code         text NOT NULL UNIQUE CHECK (user_code ~ '^[BCDFGHJKLMNPQRSTVWXZ]{8}$'),
    -- The name the daemon suggested (`login --name`); the owner's choice wins.
    requested_name    text NOT NULL DEFAULT ''
                      CHECK (length(requested_name) <= 64 AND requested_name !~ '[[:cntrl:]]'),
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL CHECK (expires_at > created_at),
    -- The least seconds between two polls; `slow_down` raises it by 5 (RFC 8628 §3.5), up to 60.
    interval_s        integer NOT NULL CHECK (interval_s BETWEEN 1 AND 60),
    last_polled_at    timestamptz,
    -- Who decided (approved or denied), and when; the approved Mac's name.
    account_id        bigint REFERENCES accounts(id) ON DELETE CASCADE,
    name              text CHECK (length(name) BETWEEN 1 AND 64 AND name !~ '[[:cntrl:]]'),
    approved_at       timestamptz,
    denied_at         timestamptz,
    -- When the daemon's poll took the token (once), and the provider it was minted for.
    consumed_at       timestamptz,
    provider_id       text REFERENCES providers(provider_id) ON DELETE SET NULL,
    CHECK (approved_at IS NULL OR denied_at IS NULL),
    CHECK ((account_id IS NULL) = (approved_at IS NULL AND denied_at IS NULL)),
    CHECK ((name IS NULL) = (approved_at IS NULL)),
    CHECK (consumed_at IS NULL OR approved_at IS NOT NULL),
    CHECK (provider_id IS NULL OR consumed_at IS NOT NULL)
);
-- Rows are swept a day after they expire (when a new code is made).
CREATE INDEX device_authorizations_expiry_idx ON device_authorizations (expires_at);

-- A sign-in may come back to the page that sent the browser to it (the device page, with its
-- code): a same-site path only, never a URL (no open redirect).
ALTER TABLE oauth_states ADD COLUMN return_to text
    CHECK (return_to IS NULL OR (length(return_to) <= 512 AND return_to ~ '^/[^/\\]'
                                 AND return_to !~ '[[:cntrl:][:space:]\\]'));
