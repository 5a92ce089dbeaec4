"""Sessions, their limits and their analytics.

``manager`` is the session manager, ``gateway`` the lookups it shares with quotas, analytics,
memory and streams, ``quotas`` the limit methods, ``analytics`` the read-model queries and
``tenants`` tenant policies at the edge.
"""
