"""Teacher-written answers: the teacher answers every prompt of a dataset (being built)."""
