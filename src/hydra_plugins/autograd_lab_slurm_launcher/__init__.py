"""The harness's SLURM launcher (`hydra/launcher=slurm`), where Hydra looks for plugins.

Hydra makes a launcher only from a class in its `hydra_plugins` namespace, and finds those
classes by importing every module under `hydra_plugins` when it starts (its documented plugin
discovery). This module is that entry: a namespace package portion (no `hydra_plugins/
__init__.py`) installed with autograd-lab, holding the name Hydra instantiates; the code is
autograd_lab.sweep.slurm_launcher. Every Hydra start imports this module, so it stays cheap (no
torch, no pandas), and importing it registers or changes nothing.

One install Hydra 1.3's scan cannot see: setuptools' editable install (`pip install -e .`, which
`make setup` does) serves this package through an import hook that the scan's pkgutil walk does
not list (hydra issue #2359; Hydra 1.4 discovers plugins by entry points instead). For that
case conf/hydra/launcher/slurm.yaml adds the callback below, which registers the class through
Hydra's public `Plugins.register` when a sweep starts, if the scan did not list it.
"""

from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher

from autograd_lab.sweep import slurm_launcher


class SlurmLauncher(slurm_launcher.SlurmLauncher):
    """autograd_lab.sweep.slurm_launcher.SlurmLauncher under the name conf/hydra/launcher/
    slurm.yaml gives (`_target_`)."""


class RegisterUnscanned(Callback):
    """`hydra.callbacks.slurm_launcher`: where the plugin scan did not list SlurmLauncher (an
    editable install), register it with Plugins.register before Hydra makes the launcher
    (Hydra calls on_multirun_start before it makes the sweeper and its launcher)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        plugins = Plugins.instance()
        if SlurmLauncher not in plugins.discover(Launcher):
            plugins.register(SlurmLauncher)


__all__ = ["SlurmLauncher", "RegisterUnscanned"]
