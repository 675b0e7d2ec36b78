"""Continual learning over a task sequence (ExSSNeT, SupSup, sequential FT)."""
