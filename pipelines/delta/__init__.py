"""The Delta layer: the sink (delta-rs commits, merges, reads), the run plan, the writers, maintenance."""
