-- A provider's own view reads what each Mac served lately (services/providers/view.py).
CREATE INDEX usage_ledger_provider_time_idx ON usage_ledger (provider_id, created_at)
    WHERE provider_id IS NOT NULL;
