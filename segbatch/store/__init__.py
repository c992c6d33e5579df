"""OUTPUT: its contract, summaries, run records, compaction, the lease, the identity file and the checks before a run."""
