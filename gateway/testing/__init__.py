"""Test harnesses that start real components (a private Slurm cluster)."""
