"""Provenance: a tamper-evident, signed, replicated ledger of every model update.

``medfed.audit.ledger`` holds the chain, ``medfed.audit.site`` the site's half,
``medfed.audit.run`` the coordinator's half that the round loop drives, and
``medfed.audit.verify`` the checks behind ``medfed ledger verify``.
"""
