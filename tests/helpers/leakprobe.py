"""A Hydra callback for the many-jobs test: after each job, what the process still holds."""

from __future__ import annotations

import gc
import json
import os
import signal
import threading

from hydra.experimental.callback import Callback


class LeakProbe(Callback):
    def __init__(self, out: str):
        self.out = out

    def on_job_end(self, config, job_return, **kwargs) -> None:
        import lightning as L
        import torch
        from torch.nn.modules import module as m
        from torch.utils.tensorboard import SummaryWriter

        gc.collect()
        hooks = sum(len(d) for d in (
            m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks,
            m._global_backward_pre_hooks, m._global_module_registration_hooks,
            m._global_parameter_registration_hooks, m._global_buffer_registration_hooks))
        objects = gc.get_objects()
        row = {
            "status": getattr(job_return, "status", None) and job_return.status.name,
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "global_hooks": hooks,
            "live_modules": sum(isinstance(o, L.LightningModule) for o in objects),
            "live_trainers": sum(isinstance(o, L.Trainer) for o in objects),
            "open_writers": sum(isinstance(o, SummaryWriter) and o.file_writer is not None
                                for o in objects),
            "profiler_on": torch.autograd.profiler._is_profiler_enabled,
            "saved_tensor_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False)
            is not None,
            "sigint": str(signal.getsignal(signal.SIGINT)),
            "sigterm": str(signal.getsignal(signal.SIGTERM)),
            "rss_mib": int(open("/proc/self/statm").read().split()[1]) * os.sysconf(
                "SC_PAGE_SIZE") / 2**20,
        }
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")
