"""Many runs: the Hydra callbacks of a sweep and the report that ends it.

`callbacks` (preflight, job folders, the sweep's own files), `runs` (reading run
directories into frames), `tables`, `figures`, `board` (the TensorBoard summary run),
`summary` (summary/ written whole), `slurm_queue` / `slurm_launcher` (the SLURM launcher)."""
