"""How commands reach actors: in process or over NATS request/reply (dispatch), and the NATS
command service that actor hosts run (service)."""
