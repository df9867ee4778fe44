"""Flower deployment runtime (issue #8).

Kept import-free on purpose: ``import medfed.runtime.flower`` must not pull in ``flwr``, so
the rest of medfed (and ``medfed --help``) works where Flower is not installed. Import the
submodules (``medfed.runtime.flower.certs``, ...) directly.
"""
