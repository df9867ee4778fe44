"""Tiny Flower App for the medfed loopback deployment tests."""
