"""The harness's stacked launcher (`hydra/launcher=stacked`), where Hydra looks for plugins.

Hydra makes a launcher only from a class in its `hydra_plugins` namespace and imports every
module there when it starts, so this entry stays cheap: the planning and training code
(autograd_lab.sweep.stacked_launcher, which imports torch) loads only when a stacked sweep
launches. As for the SLURM launcher (src/hydra_plugins/autograd_lab_slurm_launcher says why),
conf/hydra/launcher/stacked.yaml adds a callback that registers the class through Hydra's public
Plugins.register where an editable install hides it from Hydra's plugin scan.
"""

from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher


class StackedLauncher(Launcher):
    """Trains the jobs of a sweep that differ only in `seed` as one vmapped program, each job
    still a run of its own (autograd_lab/sweep/stacked_launcher.py)."""

    def __init__(self) -> None:
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides, initial_job_idx):
        from autograd_lab.sweep.stacked_launcher import launch  # torch: only when it launches

        return launch(self, job_overrides, initial_job_idx)


class RegisterUnscanned(Callback):
    """`hydra.callbacks.stacked_launcher`: register StackedLauncher where the plugin scan did
    not list it (an editable install), before Hydra makes the launcher."""

    def on_multirun_start(self, config, **kwargs) -> None:
        plugins = Plugins.instance()
        if StackedLauncher not in plugins.discover(Launcher):
            plugins.register(StackedLauncher)


__all__ = ["StackedLauncher", "RegisterUnscanned"]
