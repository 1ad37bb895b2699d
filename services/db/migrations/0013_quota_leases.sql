-- Quota leases (services/usage/leases.py): each gateway replica takes a slice of a subject's
-- remaining requests, tokens and concurrency in one statement and serves requests from memory,
-- so one busy account does not serialise every request on its quota_usage row.
--
-- quota_usage's requests/tokens/inflight keep meaning what requests used and hold; what the
-- replicas hold unused is counted apart, and a lease is granted only while
-- used + leased + grant <= limit, so the sum of leases never lets a subject overshoot.

ALTER TABLE quota_usage
    ADD COLUMN leased_requests integer NOT NULL DEFAULT 0 CHECK (leased_requests >= 0),
    ADD COLUMN leased_tokens bigint NOT NULL DEFAULT 0 CHECK (leased_tokens >= 0),
    ADD COLUMN leased_slots integer NOT NULL DEFAULT 0 CHECK (leased_slots >= 0);

-- One row per (subject, replica): the unused part of what that replica leased. Touched while the
-- replica lives; a stale row (its replica died) is given back to quota_usage by any other replica.
CREATE TABLE quota_leases (
    subject     text NOT NULL,
    gateway_id  text NOT NULL,
    window_day  date NOT NULL,
    requests    integer NOT NULL DEFAULT 0 CHECK (requests >= 0),
    tokens      bigint NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    slots       integer NOT NULL DEFAULT 0 CHECK (slots >= 0),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    -- The holder's own word on how long it may go untouched before it counts as dead (its
    -- MP_RESERVATION_STALE_S): replicas configured differently never sweep a live one's lease.
    stale_after_s real NOT NULL DEFAULT 30 CHECK (stale_after_s > 0),
    PRIMARY KEY (subject, gateway_id)
);
CREATE INDEX quota_leases_gateway_idx ON quota_leases (gateway_id);
