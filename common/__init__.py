"""Shared vocabulary of sdq: settings, the job model, tiers, the job store, storage, keys."""
