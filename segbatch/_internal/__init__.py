"""Plumbing no caller outside segbatch should import: storage retries, starting Ray, logs, RSS sampling, tallies, sizing, progress."""
