-- Whole answers' usage events (schemas/usage_events.py `Whole`: a non-stream answer's reservation and
-- settlement, published together once it ended) applied straight to the ledger: no reservations row
-- written and deleted in the same batch. With usage_apply (0016) a whole answer's reservation row was
-- inserted (heap, two indexes, a look into the ledger) and deleted again by its settlement in the same
-- call, leaving a dead tuple for vacuum: most of what Postgres spent on such a request.
--
-- What one whole does is what its reservation (0016's first part) and then its settlement (its second
-- part) would have done, summed (every change is a sum; the window-day and lease conditions are theirs):
--   its lease row (this replica's, when its window day is the reservation's): the request, its reserved
--     tokens and its slot leave the lease; the slot comes back to the row (any day) where keep_slot says;
--   the subject's row (quota_usage): the request and the tokens used count against the day (a refund:
--     neither) when its window day is the reservation's; `inflight` goes up and down again (unchanged);
--     the leased counters follow the lease row as above.
-- Idempotent: a whole already in the ledger (its event delivered again) changes nothing.
--
-- usage_apply_wholes: $1 the replica (gateway id), $2 the UTC day of the wholes' reservations, $3 the wholes
-- (a JSON array of `Whole` events as the stream carries them); returns how many it wrote to the ledger.
-- usage_apply_json with a fifth argument (the batch's wholes) applies them, then the rest as 0017 does.
CREATE OR REPLACE FUNCTION usage_apply_wholes(text, date, jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $usage_apply_wholes$
#variable_conflict use_column
DECLARE
    written bigint;
BEGIN
    WITH w AS (
        SELECT e->'opened'->>'request_id' AS request_id,
               e->'opened'->>'subject' AS subject,
               (e->'opened'->>'account_id')::bigint AS account_id,
               (e->'opened'->>'key_id')::bigint AS key_id,
               e->'opened'->>'demo_token_id' AS demo_token_id,
               e->'opened'->>'model' AS model,
               (e->'opened'->>'tokens')::bigint AS tokens,
               e->'closed'->'settlement'->>'provider_id' AS provider_id,
               (e->'closed'->'settlement'->>'prompt_tokens')::integer AS prompt_tokens,
               (e->'closed'->'settlement'->>'completion_tokens')::integer AS completion_tokens,
               (e->'closed'->'settlement'->>'cached_tokens')::integer AS cached_tokens,
               (e->'closed'->'settlement'->>'ttft_ms')::real AS ttft_ms,
               (e->'closed'->'settlement'->>'duration_ms')::real AS duration_ms,
               e->'closed'->'settlement'->>'outcome' AS outcome,
               coalesce((e->'closed'->'settlement'->>'refund')::boolean, false) AS refund,
               (e->'closed'->>'keep_slot')::boolean AS keep_slot
        FROM jsonb_array_elements($3) AS x(e)
    ), lk AS (
        -- Lock order, as everywhere: the subjects' quota_usage rows (by subject), then leases.
        SELECT subject FROM quota_usage WHERE subject IN (SELECT subject FROM w) ORDER BY subject FOR UPDATE
    ), led AS (
        INSERT INTO usage_ledger
            (request_id, subject, account_id, key_id, demo_token_id, model, provider_id, prompt_tokens,
             completion_tokens, cached_tokens, ttft_ms, duration_ms, outcome, billed)
        SELECT request_id, subject, account_id, key_id, demo_token_id, model, provider_id, prompt_tokens,
               completion_tokens, cached_tokens, ttft_ms, duration_ms, outcome, NOT refund
        FROM w
        WHERE w.subject IN (SELECT subject FROM lk)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING request_id
    ), agg AS (
        SELECT w.subject, count(*)::int AS n, sum(w.tokens)::bigint AS t, sum(w.keep_slot::int)::int AS keep,
               sum(CASE WHEN w.refund THEN 0 ELSE 1 END)::int AS billed_r,
               sum(CASE WHEN w.refund THEN 0 ELSE w.prompt_tokens + w.completion_tokens END)::bigint AS used_t
        FROM w JOIN led ON led.request_id = w.request_id
        GROUP BY w.subject
    ), l AS (
        UPDATE quota_leases l SET
            requests = l.requests - CASE WHEN l.window_day = $2 THEN agg.n ELSE 0 END,
            tokens = l.tokens - CASE WHEN l.window_day = $2 THEN agg.t ELSE 0 END,
            slots = l.slots - CASE WHEN l.window_day = $2 THEN agg.n ELSE 0 END + agg.keep,
            last_seen = now()
        FROM agg
        WHERE l.subject = agg.subject AND l.gateway_id = $1 AND (l.window_day = $2 OR agg.keep > 0)
        RETURNING l.subject, l.window_day = $2 AS same_day
    ), u AS (
        UPDATE quota_usage q SET
            requests = q.requests + CASE WHEN q.window_day = $2 THEN agg.billed_r ELSE 0 END,
            tokens = q.tokens + CASE WHEN q.window_day = $2 THEN agg.used_t ELSE 0 END,
            leased_requests = q.leased_requests
                - CASE WHEN q.window_day = $2 AND agg.subject IN (SELECT subject FROM l WHERE same_day)
                       THEN agg.n ELSE 0 END,
            leased_tokens = q.leased_tokens
                - CASE WHEN q.window_day = $2 AND agg.subject IN (SELECT subject FROM l WHERE same_day)
                       THEN agg.t ELSE 0 END,
            leased_slots = q.leased_slots
                - CASE WHEN agg.subject IN (SELECT subject FROM l WHERE same_day) THEN agg.n ELSE 0 END
                + CASE WHEN agg.subject IN (SELECT subject FROM l) THEN agg.keep ELSE 0 END
        FROM agg
        WHERE q.subject = agg.subject
        RETURNING 1
    )
    SELECT count(*) INTO written FROM led;
    RETURN written;
END;
$usage_apply_wholes$;

-- A batch with wholes: them, then its reservations and settlements (usage_apply_json), in one call. The
-- consumer also sends a streamed request's reservation and settlement as a whole when both are in the batch;
-- one whose reservation row exists already (written by an earlier batch, its message delivered again with the
-- settlement's) goes the usage_apply way instead: its reservation is there, its settlement deletes it.
CREATE OR REPLACE FUNCTION usage_apply_json(text, date, jsonb, jsonb, jsonb)
RETURNS TABLE (request_id text, to_lease boolean, subjects bigint, written bigint)
LANGUAGE plpgsql AS $usage_apply_json5$
DECLARE
    fresh jsonb;
    opens jsonb;
    closes jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(e ORDER BY n) FILTER (WHERE r.request_id IS NULL), '[]'),
           coalesce(jsonb_agg(e->'opened' ORDER BY n) FILTER (WHERE r.request_id IS NOT NULL), '[]'),
           coalesce(jsonb_agg(e->'closed' ORDER BY n) FILTER (WHERE r.request_id IS NOT NULL), '[]')
    INTO fresh, opens, closes
    FROM jsonb_array_elements($5) WITH ORDINALITY AS x(e, n)
    LEFT JOIN reservations r ON r.request_id = e->'opened'->>'request_id';
    PERFORM usage_apply_wholes($1, $2, fresh);
    RETURN QUERY SELECT * FROM usage_apply_json($1, $2, $3 || opens, $4 || closes);
END;
$usage_apply_json5$;
