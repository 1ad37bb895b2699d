"""The NATS auth callout: who may connect to the bus, decided per connection against Postgres.

The nats-server (config mode: `authorization { auth_callout { issuer, auth_users,
account, xkey } }`) holds no provider user. Each connection attempt reaches this
service as a signed request; a provider token (`mpp_`) or the control plane's own
credential gets a user JWT, signed by the issuer account, carrying exactly its
subjects (schemas/permissions.py) and an expiry. Revocations and bans close the
provider's connections at once (disconnect.py).
"""
