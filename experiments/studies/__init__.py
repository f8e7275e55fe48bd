"""Finished studies: each answers one question (its first docstring line), with its flagfile beside it
and its results under experiments/results/."""
