"""Training, virtual cohort and evaluation for the screener's models."""
