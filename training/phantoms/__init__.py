"""Virtual cohort: synthetic patients with physically consistent ground truth."""
