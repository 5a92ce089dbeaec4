"""Sessions and their limits: the session manager (manager), the gateway it shares with quotas,
analytics, memory and streams (gateway), quota and rate decisions (quotas), read-model queries
(analytics) and tenant policies at the edge (tenants)."""
