"""Differential privacy: accounting, the persistent per-site ledger, and Opacus wiring."""
