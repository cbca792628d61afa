"""Simulations driven by the daemon's own scheduling code (no guests, no sleeping)."""
