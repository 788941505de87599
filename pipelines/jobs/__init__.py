"""Jobs: `embed_notes` (a note table into Delta) and `neighbours` (nearest notes by note vector)."""
