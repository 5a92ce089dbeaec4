"""Session streams, replayed from the log and then followed live.

``subscription`` holds the subscriptions, ``backlog`` the pure ordering and coalescing, ``feeds``
the live reading shared by every subscriber of a session.
"""
