-- Responses API: answers kept for `previous_response_id`, GET and DELETE, by any gateway replica.
-- `input` is the whole conversation the response answered (earlier turns spliced in), so a
-- continuation needs one row. Both are msgspec-encoded JSON in bytea: model text may hold NUL
-- characters, which jsonb refuses.
CREATE TABLE stored_responses (
    id          text PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    input       bytea NOT NULL,
    response    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

CREATE INDEX stored_responses_expires_idx ON stored_responses (expires_at);
