"""What the harness writes and reads, torch-free: atomic writes and safe tensor-file reads
(`files`), the run lock and the entries it refuses (`lock`), the format numbers (`formats`)."""
