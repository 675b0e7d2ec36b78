"""Fusion beyond task vectors: logits (logits_*) and optimal transport (ot_*)."""
