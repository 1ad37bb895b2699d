-- Providers the pool knows: admission (pinned / provisional / banned), drains, sightings.
--
-- A provider id that heartbeats for the first time gets a 'pending' row and is not
-- routable. It becomes routable when an operator pins it, or when a gateway admits it
-- provisionally, drawing one token from the bucket below: at most
-- MP_PROVISIONAL_ADMISSIONS_PER_MIN a minute across every replica. A banned provider
-- is never routable; a draining one finishes its requests and gets no new ones.

CREATE TABLE providers (
    provider_id  text PRIMARY KEY,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'provisional', 'pinned', 'banned')),
    draining     boolean NOT NULL DEFAULT false,
    -- Sightings (heartbeats); NULL for an id an operator named before it ever showed up.
    first_seen   timestamptz,
    last_seen    timestamptz,
    admitted_at  timestamptz,
    note         text NOT NULL DEFAULT '',
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- The provisional-admission token bucket: one row, so its row lock orders every
-- replica's draw and a burst of unknown ids can never take more than the bucket holds.
CREATE TABLE provider_admission_bucket (
    id           smallint PRIMARY KEY CHECK (id = 1),
    -- NULL: full (the capacity is the per-minute rate, given by the drawing replica).
    tokens       double precision,
    refilled_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO provider_admission_bucket (id) VALUES (1);

-- Every gateway caches admission decisions and LISTENs on this channel; the notice
-- leaves when the change commits, whoever made it (a gateway's admission, the admin
-- CLI, an operator's SQL). New pending rows and sightings are nobody else's business.
CREATE FUNCTION notify_provider_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row providers;
BEGIN
    IF TG_OP = 'DELETE' THEN
        row := OLD;
        row.status := 'pending';
        row.draining := false;
    ELSE
        row := NEW;
        IF TG_OP = 'INSERT' AND NEW.status = 'pending' AND NOT NEW.draining THEN
            RETURN NEW;
        END IF;
    END IF;
    PERFORM pg_notify(
        'mp_provider_changed',
        json_build_object('id', row.provider_id, 'status', row.status, 'draining', row.draining)::text
    );
    RETURN row;
END;
$$;

CREATE TRIGGER providers_changed
    AFTER INSERT OR UPDATE OF status, draining OR DELETE ON providers
    FOR EACH ROW EXECUTE FUNCTION notify_provider_changed();
