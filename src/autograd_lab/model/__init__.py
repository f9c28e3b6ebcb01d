"""The networks and what a study varies in them.

`networks` (SmallNet, ResNet18, weights), `variants` (freeze, detach, eval grad mode),
`functions` (hand-written autograd Functions and their check), `module` (the
LightningModule: the seed's step in plain sight)."""
