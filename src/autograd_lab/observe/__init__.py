"""What a run measures besides its loss.

`probes` (when to measure: a Lightning callback), `dynamics` (the math only: sharpness,
gradient noise), `graph` and `graph_view` (the backward graph and its saved tensors, drawn),
`memory` (bytes a step keeps), `profiling` (the torch profiler's tables), `step_check`
(one optimizer step against its update rule)."""
