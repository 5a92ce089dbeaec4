"""Session streams: subscriptions that replay a session's channel messages from the log and
then follow live (subscription), and the pure backlog that orders and coalesces them (backlog)."""
