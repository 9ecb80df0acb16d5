"""Trainer integrations; the core package imports none of them except the HF registry on import."""
