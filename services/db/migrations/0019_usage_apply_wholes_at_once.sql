-- A batch's wholes go to usage_apply_wholes as they came, when none of them has a reservation row: the
-- usual case (a whole's reservation row exists only when its stream's reservation was written by an
-- earlier batch and the pair was delivered again). 0018 split every batch's wholes by a join with
-- reservations and rebuilt them into new JSON arrays, then called usage_apply_json with the four-argument
-- form even when it had nothing to apply: half of what Postgres spent per whole answer (a batch of 200:
-- 28-30 us per whole against 14-17 us for usage_apply_wholes alone, 2026-12-07). The check is one index
-- probe per whole; a batch with such a whole goes the 0018 way. Same arguments and result as 0018's.
CREATE OR REPLACE FUNCTION usage_apply_json(text, date, jsonb, jsonb, jsonb)
RETURNS TABLE (request_id text, to_lease boolean, subjects bigint, written bigint)
LANGUAGE plpgsql AS $usage_apply_json5$
DECLARE
    fresh jsonb;
    opens jsonb := '[]';
    closes jsonb := '[]';
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements($5) AS x(e)
        JOIN reservations r ON r.request_id = e->'opened'->>'request_id'
    ) THEN
        PERFORM usage_apply_wholes($1, $2, $5);
    ELSE
        SELECT coalesce(jsonb_agg(e ORDER BY n) FILTER (WHERE r.request_id IS NULL), '[]'),
               coalesce(jsonb_agg(e->'opened' ORDER BY n) FILTER (WHERE r.request_id IS NOT NULL), '[]'),
               coalesce(jsonb_agg(e->'closed' ORDER BY n) FILTER (WHERE r.request_id IS NOT NULL), '[]')
        INTO fresh, opens, closes
        FROM jsonb_array_elements($5) WITH ORDINALITY AS x(e, n)
        LEFT JOIN reservations r ON r.request_id = e->'opened'->>'request_id';
        PERFORM usage_apply_wholes($1, $2, fresh);
    END IF;
    -- Nothing else to apply (a batch of whole answers alone): usage_apply would do nothing and return no row.
    IF jsonb_array_length($3) + jsonb_array_length($4) + jsonb_array_length(opens) > 0 THEN
        RETURN QUERY SELECT * FROM usage_apply_json($1, $2, $3 || opens, $4 || closes);
    END IF;
END;
$usage_apply_json5$;
