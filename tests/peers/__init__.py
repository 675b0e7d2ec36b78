"""Parity with mergekit and FusionBench themselves (the `peers` extra)."""
