-- Accounts and their API keys. Only a SHA-256 of each key is stored: keys are
-- 128+ bits of randomness, so a fast hash is enough and lookups stay indexable.
CREATE TABLE accounts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    login       text NOT NULL,
    github_id   bigint UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    key_hash      bytea NOT NULL UNIQUE,
    -- The first characters of the key, shown to its owner so they can tell keys apart.
    prefix        text NOT NULL,
    name          text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

CREATE INDEX api_keys_account_idx ON api_keys (account_id);
