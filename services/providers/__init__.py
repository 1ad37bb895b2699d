"""Provider admission: pinned / provisional / banned / draining, in Postgres and cached per replica."""
