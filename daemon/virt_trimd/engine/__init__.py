"""Trimming: one domain, a sweep of many, schedules, the SQLite history and in-memory state."""
