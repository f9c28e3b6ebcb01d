"""One training run: its parts, its fit, its record.

`runner` (one run, start to record: what `train.run` calls), `build` (the parts from the
config), `fit` (Lightning's fit, the outcome classified, resume point), `record` (run.json
and metrics.parquet), `recorder` (every-step curves to every logger), `progress` (what a run
shows while it trains), `checkpoint` (saves and stop signals), `resumable` (may this
checkpoint continue this run?), `rundir` (the run directory's format and reader), `board`
(HParams and Custom Scalars), `messages` (the lines a run prints), `distributed` (DDP jobs
under Hydra)."""
