"""Event-sourced memory: semantic recall and a key-value cache, per scope.

``service`` is the memory API, ``index`` its LanceDB index projected from the log, ``rows`` the
in-memory copy of each scope's current rows, ``fulltext`` BM25 keyword ranking and ``keys`` the
per-user data keys for crypto-shredding.
"""
