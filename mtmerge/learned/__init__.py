"""Learned merges: methods that use data (see `problem.MergeProblem`)."""
