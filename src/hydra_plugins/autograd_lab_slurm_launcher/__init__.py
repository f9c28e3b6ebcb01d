"""The harness's SLURM launcher (`hydra/launcher=slurm`), where Hydra looks for plugins.

Hydra makes a launcher only from a class in its `hydra_plugins` namespace, and finds those
classes by importing every module under `hydra_plugins` when it starts (its documented plugin
discovery). This module is that entry: a namespace package portion (no `hydra_plugins/
__init__.py`) installed with autograd-lab, holding nothing but the name Hydra instantiates. The
code is autograd_lab.sweep.slurm_launcher. Every Hydra start imports this module, so it stays
cheap: no torch, no pandas, and nothing registered or changed by importing it.
"""

from autograd_lab.sweep import slurm_launcher


class SlurmLauncher(slurm_launcher.SlurmLauncher):
    """autograd_lab.sweep.slurm_launcher.SlurmLauncher under the name conf/hydra/launcher/
    slurm.yaml gives (`_target_`)."""


__all__ = ["SlurmLauncher"]
