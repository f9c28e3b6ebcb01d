"""The config: Hydra composes it, this package checks it, torch-free.

`keys` (the facts about keys: what changes a result, run names, flat views), `schema` (the
checks of each value), `targets` (which `_target_` may be made, with which arguments),
`annotations` (a value read against a type hint), `compose` (Hydra's compose API with one-line
errors), `resources` (memory, disk, download), `preflight` (every check of a command line or
sweep before anything runs)."""
