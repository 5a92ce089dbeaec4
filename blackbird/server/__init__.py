"""The embedded nats-server a Blackbird data folder runs on (embedded)."""
