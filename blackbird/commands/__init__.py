"""How commands reach actors, in process or over NATS request/reply.

``dispatch`` sends them; ``service`` is the NATS command service that actor hosts run.
"""
