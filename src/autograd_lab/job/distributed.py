"""`trainer=ddp`: Lightning's DDP strategy, with the Hydra pitfall handled.

Lightning starts ranks 1..N-1 by running the script again. Under Hydra its default command is the
original command line, so in a sweep (`-m a=1,2`) every rank would launch the whole sweep, and each
rank would make its own output directory. Here the other ranks run exactly this job: its own
overrides (not the sweep's lists), in this job's run directory, with no `.hydra/` or log files of
their own. Rank 0 alone writes the run's files (TensorBoard, metrics.parquet, run.json,
checkpoints).

Batches: each rank takes its share of the epoch's order (data.ResidentBatches), so the global batch
is `data.batch_size x devices`; gradients are averaged by DDP, losses and validation sums are
reduced across ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def child_command(local_rank: int) -> tuple[list[str], str]:
    """Rank `local_rank`'s command: this job's own overrides, in this job's run directory."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    config_args = ["--config-name", hc.job.config_name]  # what this job was composed from
    for source in hc.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            config_args += ["--config-dir", source.path]
    searchpath = [o for o in hc.overrides.hydra if o.startswith("hydra.searchpath")]
    command = [sys.executable, "-m", "autograd_lab.train", *config_args, *searchpath,
               *hc.overrides.task,
               # quoted: a sweep's job directory is named `a=1,b=2`, which Hydra would parse
               f"hydra.run.dir='{_escape(hc.runtime.output_dir)}'", "hydra.output_subdir=null",
               f"hydra.job.name=train_rank_{local_rank}", "hydra/job_logging=disabled",
               "hydra/hydra_logging=disabled", "trainer.progress_bar=false"]
    return command, hc.runtime.cwd


def _escape(path: str) -> str:
    """A path inside a single-quoted Hydra override value (quotes, backslashes and `${`, which
    Hydra would resolve even inside quotes, escaped)."""
    return str(path).replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent ends, even on SIGKILL: a DDP rank when
    rank 0 does (no orphan holding a GPU), a parallel sweep's worker when the sweep does (it
    then saves a checkpoint at its next step and stops, as for any SIGTERM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _JobLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher with `child_command` for the other ranks."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # called from Python, not the CLI: Lightning's way
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            command, cwd = child_command(local_rank)
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd,
                                               preexec_fn=die_with_parent))
        return None


class HydraDDPStrategy(DDPStrategy):
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _JobLauncher(self.cluster_environment, self.num_processes,
                                          self.num_nodes)


def strategy(cfg, find_unused: bool):
    """The Trainer's strategy for `cfg.trainer.strategy`."""
    if cfg.trainer.strategy == "ddp":
        # a detach point leaves parameters without gradients: DDP must be told to expect it
        return HydraDDPStrategy(find_unused_parameters=find_unused)
    return "auto"
