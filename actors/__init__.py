"""The actor runtime (host, activation, snapshots) and the aggregates' pure decide/evolve logic.

Nothing in this package performs I/O directly: the host talks to the log and the snapshot
store through the small protocols in :mod:`actors.ports`.
"""
