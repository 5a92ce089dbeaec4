"""Event-sourced memory: the memory API (service), its LanceDB index projected from the log
(index), the in-memory copy of each scope's current rows (rows), BM25 keyword ranking (fulltext)
and per-user data keys for crypto-shredding (keys)."""
