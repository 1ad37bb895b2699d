-- usage_apply (0016), its events passed as two JSON arrays instead of seventeen typed arrays.
--
-- The ledger's consumer (services/usage/ledger.py) wrote each batch with an array per column: asyncpg
-- checks every element of an array parameter for being an array itself, with two abstract-class
-- isinstance checks per string and one per number, a Python call each. That was 3.4% of a gateway's
-- CPU per non-stream request (callgrind). Encoded by msgspec, the events are one C call; Postgres
-- unpacks them here, in the order given, and applies them with usage_apply.
--
-- Arguments: $1 the replica (gateway id), $2 the UTC day of the reservations; $3 the reservations and
-- $4 the settlements, each a JSON array of the usage events as the stream carries them
-- (schemas/usage_events.py: Opened, Closed). Returns what usage_apply returns.
CREATE OR REPLACE FUNCTION usage_apply_json(text, date, jsonb, jsonb)
RETURNS TABLE (request_id text, to_lease boolean, subjects bigint, written bigint)
LANGUAGE plpgsql AS $usage_apply_json$
DECLARE
    o_request_id text[]; o_subject text[]; o_account_id bigint[]; o_key_id bigint[]; o_demo_token_id text[];
    o_model text[]; o_tokens bigint[];
    c_request_id text[]; c_provider_id text[]; c_prompt integer[]; c_completion integer[]; c_cached integer[];
    c_ttft real[]; c_duration real[]; c_outcome text[]; c_refund boolean[]; c_keep_slot boolean[];
BEGIN
    SELECT coalesce(array_agg(e->>'request_id' ORDER BY n), '{}'),
           coalesce(array_agg(e->>'subject' ORDER BY n), '{}'),
           coalesce(array_agg((e->>'account_id')::bigint ORDER BY n), '{}'),
           coalesce(array_agg((e->>'key_id')::bigint ORDER BY n), '{}'),
           coalesce(array_agg(e->>'demo_token_id' ORDER BY n), '{}'),
           coalesce(array_agg(e->>'model' ORDER BY n), '{}'),
           coalesce(array_agg((e->>'tokens')::bigint ORDER BY n), '{}')
    INTO o_request_id, o_subject, o_account_id, o_key_id, o_demo_token_id, o_model, o_tokens
    FROM jsonb_array_elements($3) WITH ORDINALITY AS x(e, n);
    SELECT coalesce(array_agg(e->>'request_id' ORDER BY n), '{}'),
           coalesce(array_agg(e->'settlement'->>'provider_id' ORDER BY n), '{}'),
           coalesce(array_agg((e->'settlement'->>'prompt_tokens')::integer ORDER BY n), '{}'),
           coalesce(array_agg((e->'settlement'->>'completion_tokens')::integer ORDER BY n), '{}'),
           coalesce(array_agg((e->'settlement'->>'cached_tokens')::integer ORDER BY n), '{}'),
           coalesce(array_agg((e->'settlement'->>'ttft_ms')::real ORDER BY n), '{}'),
           coalesce(array_agg((e->'settlement'->>'duration_ms')::real ORDER BY n), '{}'),
           coalesce(array_agg(e->'settlement'->>'outcome' ORDER BY n), '{}'),
           -- Absent where the encoder left a default out (msgspec writes every field today).
           coalesce(array_agg(coalesce((e->'settlement'->>'refund')::boolean, false) ORDER BY n), '{}'),
           coalesce(array_agg((e->>'keep_slot')::boolean ORDER BY n), '{}')
    INTO c_request_id, c_provider_id, c_prompt, c_completion, c_cached, c_ttft, c_duration, c_outcome,
         c_refund, c_keep_slot
    FROM jsonb_array_elements($4) WITH ORDINALITY AS x(e, n);
    RETURN QUERY SELECT * FROM usage_apply(
        $1, $2,
        o_request_id, o_subject, o_account_id, o_key_id, o_demo_token_id, o_model, o_tokens,
        c_request_id, c_provider_id, c_prompt, c_completion, c_cached, c_ttft, c_duration, c_outcome,
        c_refund, c_keep_slot
    );
END;
$usage_apply_json$;
