-- One round trip for a batch of usage events (services/usage/ledger.py): its reservations, then its
-- settlements, in one call. The ledger wrote a batch as BEGIN, two statements and COMMIT: four round
-- trips, each a wake-up of Postgres and of the gateway (on a loaded host a batch cost Postgres about
-- 2 ms of CPU and the gateway about 1 ms, most of it in those wake-ups, not in the statements). A
-- function call is one statement, so it is atomic on its own: nobody sees a lease counter between the
-- two parts (0014). PL/pgSQL keeps its statements' plans for the session, as prepared statements do.
--
-- Arguments: $1 the replica (gateway id), $2 the UTC day of the reservations; $3-$9 the reservations
-- (request_id, subject, account_id, key_id, demo_token_id, model, tokens); $10-$19 the settlements
-- (request_id, provider_id, prompt_tokens, completion_tokens, cached_tokens, ttft_ms, duration_ms,
-- outcome, refund, keep_slot). Returns a row per request settled now: whether its slot went back to
-- this replica's lease, and how many subjects and ledger rows the settlements touched.
--
-- To change a statement, a later migration replaces the function (CREATE OR REPLACE).
CREATE OR REPLACE FUNCTION usage_apply(
    text, date,
    text[], text[], bigint[], bigint[], text[], text[], bigint[],
    text[], text[], integer[], integer[], integer[], real[], real[], text[], boolean[], boolean[]
) RETURNS TABLE (request_id text, to_lease boolean, subjects bigint, written bigint)
LANGUAGE plpgsql AS $usage_apply$
#variable_conflict use_column
DECLARE
    opened bigint;
BEGIN
IF cardinality($3) > 0 THEN
    -- Reservations applied after the request was admitted and perhaps already answered: never refused
    -- any more. Idempotent (an event delivered again after a consumer died before acknowledging it
    -- writes nothing twice: a reservation already there, or already settled into the ledger, is
    -- skipped). Where the replica's lease no longer holds the request (a peer gave back the lease of a
    -- replica that looked dead), it counts straight against the subject.
    WITH p AS (
        SELECT * FROM unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::text[], $8::text[], $9::bigint[])
            AS p(request_id, subject, account_id, key_id, demo_token_id, model, tokens)
    ), lk AS (
        SELECT subject FROM quota_usage WHERE subject IN (SELECT subject FROM p) ORDER BY subject FOR UPDATE
    ), ins AS (
        INSERT INTO reservations
            (request_id, subject, account_id, key_id, demo_token_id, model, window_day, tokens_reserved, gateway_id)
        SELECT p.request_id, p.subject, p.account_id, p.key_id, p.demo_token_id, p.model, $2, p.tokens, $1
        FROM p
        WHERE p.subject IN (SELECT subject FROM lk)
          AND NOT EXISTS (SELECT 1 FROM usage_ledger g WHERE g.request_id = p.request_id)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING request_id, subject, tokens_reserved
    ), agg AS (
        SELECT subject, count(*)::int AS n, sum(tokens_reserved)::bigint AS t FROM ins GROUP BY subject
    ), l AS (
        -- No check that the row still holds enough: a batch applies its opens before its closes, so a slot
        -- a close gave back to the lease, and an open then took again, may leave the row one short until
        -- the close that follows in the same batch (every change here is a sum: the order does not matter).
        UPDATE quota_leases l SET requests = l.requests - agg.n, tokens = l.tokens - agg.t, slots = l.slots - agg.n,
                                  last_seen = now()
        FROM agg
        WHERE l.subject = agg.subject AND l.gateway_id = $1 AND l.window_day = $2
        RETURNING l.subject
    ), u AS (
        UPDATE quota_usage q SET
            requests = q.requests + CASE WHEN q.window_day = $2 THEN agg.n ELSE 0 END,
            tokens = q.tokens + CASE WHEN q.window_day = $2 THEN agg.t ELSE 0 END,
            inflight = q.inflight + agg.n,
            leased_requests = CASE WHEN q.window_day = $2 AND agg.subject IN (SELECT subject FROM l)
                                   THEN q.leased_requests - agg.n ELSE q.leased_requests END,
            leased_tokens = CASE WHEN q.window_day = $2 AND agg.subject IN (SELECT subject FROM l)
                                 THEN q.leased_tokens - agg.t ELSE q.leased_tokens END,
            leased_slots = CASE WHEN agg.subject IN (SELECT subject FROM l)
                                THEN q.leased_slots - agg.n ELSE q.leased_slots END
        FROM agg
        WHERE q.subject = agg.subject
        RETURNING 1
    )
    SELECT count(*) INTO opened FROM ins;
END IF;
IF cardinality($10) > 0 THEN
    -- Settlements: ledger rows, reservations gone, unused tokens and refunded requests back to the
    -- subject, and each slot back to this replica's lease (when it still has one) where keep_slot says
    -- this replica is busy with the subject, else back to the subject: a subject with a small
    -- concurrency limit (a demo token's 1) never finds its one slot parked on another replica.
    RETURN QUERY
    WITH p AS (
        SELECT * FROM unnest($10::text[], $11::text[], $12::int[], $13::int[], $14::int[], $15::real[], $16::real[],
                             $17::text[], $18::bool[], $19::bool[])
            AS p(request_id, provider_id, prompt_tokens, completion_tokens, cached_tokens, ttft_ms, duration_ms,
                 outcome, refund, keep_slot)
    ), lk AS (
        SELECT subject FROM quota_usage
        WHERE subject IN (SELECT res.subject FROM reservations res JOIN p ON p.request_id = res.request_id)
        ORDER BY subject FOR UPDATE
    ), r AS (
        DELETE FROM reservations res USING p
        WHERE res.request_id = p.request_id AND res.subject IN (SELECT subject FROM lk)
        RETURNING res.request_id, res.subject, res.account_id, res.key_id, res.demo_token_id, res.model,
                  res.window_day, res.tokens_reserved, coalesce(p.provider_id, res.provider_id) AS provider_id,
                  p.prompt_tokens, p.completion_tokens, p.cached_tokens, p.ttft_ms, p.duration_ms, p.outcome, p.refund,
                  p.keep_slot
    ), led AS (
        INSERT INTO usage_ledger
            (request_id, subject, account_id, key_id, demo_token_id, model, provider_id, prompt_tokens,
             completion_tokens, cached_tokens, ttft_ms, duration_ms, outcome, billed)
        SELECT request_id, subject, account_id, key_id, demo_token_id, model, provider_id, prompt_tokens,
               completion_tokens, cached_tokens, ttft_ms, duration_ms, outcome, NOT refund
        FROM r
        ON CONFLICT (request_id) DO NOTHING
        RETURNING request_id
    ), agg AS (
        SELECT r.subject, count(*)::int AS n, sum(r.keep_slot::int)::int AS keep,
               sum(CASE WHEN r.window_day = q.window_day
                        THEN r.tokens_reserved - CASE WHEN r.refund THEN 0 ELSE r.prompt_tokens + r.completion_tokens END
                        ELSE 0 END)::bigint AS give_t,
               sum(CASE WHEN r.refund AND r.window_day = q.window_day THEN 1 ELSE 0 END)::int AS give_r
        FROM r JOIN quota_usage q ON q.subject = r.subject
        GROUP BY r.subject
    ), l AS (
        UPDATE quota_leases l SET slots = l.slots + agg.keep, last_seen = now()
        FROM agg
        WHERE l.subject = agg.subject AND l.gateway_id = $1 AND agg.keep > 0
        RETURNING l.subject
    ), upd AS (
        UPDATE quota_usage u SET
            inflight = u.inflight - agg.n,
            tokens = greatest(0, u.tokens - agg.give_t),
            requests = greatest(0, u.requests - agg.give_r),
            leased_slots = u.leased_slots + CASE WHEN agg.subject IN (SELECT subject FROM l) THEN agg.keep ELSE 0 END
        FROM agg
        WHERE u.subject = agg.subject
        RETURNING 1
    )
    SELECT r.request_id, r.keep_slot AND r.subject IN (SELECT subject FROM l) AS to_lease,
           (SELECT count(*) FROM upd) AS subjects, (SELECT count(*) FROM led) AS written
    FROM r;
END IF;
END
$usage_apply$;
