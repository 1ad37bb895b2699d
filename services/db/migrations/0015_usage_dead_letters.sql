-- Usage events the ledger could not write however often it tried (services/usage/ledger.py): one that
-- does not decode, or one Postgres refuses for what it holds (a value out of range, a violated
-- constraint), not because it is down. Such an event once blocked its replica's whole subject: every
-- later settlement waited behind it. It is kept here, byte for byte, for an operator to look at, and the
-- events after it are written.
CREATE TABLE IF NOT EXISTS usage_dead_letters (
    id          bigserial PRIMARY KEY,
    gateway_id  text NOT NULL,
    stream_seq  bigint,
    event       bytea NOT NULL,
    error       text NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now()
);
-- A batch tried again (Postgres went away meanwhile) parks each event once.
CREATE UNIQUE INDEX IF NOT EXISTS usage_dead_letters_event ON usage_dead_letters (gateway_id, stream_seq);
