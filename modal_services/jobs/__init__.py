"""Jobs: one typed request per job kind, job records and progress, and job slots (the caps)."""
