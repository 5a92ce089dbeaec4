"""The HTTP edge: a Starlette app serving session streams as Server-Sent Events (app)."""
