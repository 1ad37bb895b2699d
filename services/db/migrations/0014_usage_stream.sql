-- The usage stream (services/usage/ledger.py) writes a batch of one replica's events in one
-- transaction: its reservations first, then its settlements. A slot that a settlement gave back to
-- the lease and a later reservation took again can leave a lease counter one short between the two
-- statements; at commit every counter is what the events in their order make it. Column checks are
-- immediate (PostgreSQL cannot defer them), so the non-negative checks on lease counters go; the
-- statements that grant and give back leases still check what they take.
ALTER TABLE quota_leases
    DROP CONSTRAINT IF EXISTS quota_leases_requests_check,
    DROP CONSTRAINT IF EXISTS quota_leases_tokens_check,
    DROP CONSTRAINT IF EXISTS quota_leases_slots_check;
ALTER TABLE quota_usage
    DROP CONSTRAINT IF EXISTS quota_usage_leased_requests_check,
    DROP CONSTRAINT IF EXISTS quota_usage_leased_tokens_check,
    DROP CONSTRAINT IF EXISTS quota_usage_leased_slots_check;
