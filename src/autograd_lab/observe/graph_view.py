"""The backward graph shown: module scopes for its nodes, the TensorBoard graph (a GraphDef
written once, at the first step), and the DOT/SVG drawing of `autograd-lab graph`."""

from __future__ import annotations

import time
from collections import defaultdict

import lightning as L
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from autograd_lab.data.loader import CIFARDataModule, _prepare, load_split_tensors
from autograd_lab.observe.graph import Graph, walk


# ------------------------------------------------------------------ modules, for TensorBoard
class _Scopes(TorchFunctionMode):
    """Sees every op's output during a forward pass and files the node that made it under the
    module whose forward is running (a stack kept by module hooks)."""

    def __init__(self):
        super().__init__()
        self.stack, self.scopes = [""], {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.scopes.setdefault(t.grad_fn, self.stack[-1])
        return out

    def install(self, model: nn.Module, mode_in_forward: bool = False) -> list:
        """Module hooks that keep the stack of module names; with `mode_in_forward`, the mode is
        also entered and left around `model`'s own forward (left even if it raises). Returns
        the hook handles (remove them when done)."""
        def enter(name):
            def hook(module, args):
                self.stack.append(name)
            return hook

        def leave(module, args, output):
            self.stack.pop()

        handles = []
        for name, module in model.named_modules():
            if name:
                handles += [module.register_forward_pre_hook(enter(name)),
                            module.register_forward_hook(leave, always_call=True)]
        if mode_in_forward:
            def start(module, args):
                self.__enter__()

            def end(module, args, output):
                self.__exit__(None, None, None)

            handles += [model.register_forward_pre_hook(start, prepend=True),
                        model.register_forward_hook(end, always_call=True)]
        return handles


def module_scopes(model: nn.Module, forward):
    """Run `forward()` and return (its result, {graph node: name of the innermost module whose
    forward made it}); the module hooks are removed again."""
    rec = _Scopes()
    handles = rec.install(model)
    try:
        with rec:
            result = forward()
    finally:
        for h in handles:
            h.remove()
    return result, rec.scopes


def graph_def(graph: Graph):
    """The walk as a TensorBoard GraphDef: one node per graph node, named `<module path>/<op>`
    ('/' scopes group a module's nodes; a parameter's leaf is `<module path>/<name>`, op
    `AccumulateGrad`); a node's inputs are its next functions (the direction of the DOT picture:
    the forward pass's, gradients flow against the arrows). Attributes: `saved` (what the node
    keeps for backward), `saved_bytes` (counted: neither model state nor resident data),
    `param` on leaves; the loss node also `graph_saved_bytes` and `graph_nodes`."""
    from tensorboard.compat.proto.attr_value_pb2 import AttrValue
    from tensorboard.compat.proto.graph_pb2 import GraphDef

    names, taken = {}, set()
    for n in graph.nodes:
        if n["param"]:
            base = n["param"].replace(".", "/")
        else:
            scope = (n["module"] or "").replace(".", "/")
            base = f"{scope}/{n['name']}" if scope else n["name"]
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        names[n["id"]] = name
    inputs = defaultdict(list)
    for a, b in graph.edges:
        inputs[a].append(names[b])
    out = GraphDef()
    for n in graph.nodes:
        attr = {"saved_bytes": AttrValue(i=n["saved_bytes"])}
        if n["saved"]:
            attr["saved"] = AttrValue(s=n["saved"].encode())
        if n["param"]:
            attr["param"] = AttrValue(s=n["param"].encode())
        if n["id"] == 0:
            attr["graph_saved_bytes"] = AttrValue(i=graph.saved_bytes)
            attr["graph_nodes"] = AttrValue(i=len(graph.nodes))
        out.node.add(name=names[n["id"]], op=n["name"], input=inputs[n["id"]], attr=attr)
    return out


def write_graph(writer, gdef) -> None:
    """Put a GraphDef into a SummaryWriter's event file, as the Graphs dashboard reads it (an
    Event with `graph_def`). torch's public `SummaryWriter.add_graph` traces a model with
    torch.jit and takes no ready GraphDef, so this goes through the writer's file writer:
    `_get_file_writer()` is private (it also writes a resumed run's purge marker first);
    tests/test_tensorboard_graph_profiler.py::test_summary_writer_takes_a_graph_def fails if
    torch changes it."""
    from tensorboard.compat.proto.event_pb2 import Event

    writer._get_file_writer().add_event(Event(graph_def=gdef.SerializeToString()))
    writer.flush()


class TensorBoardGraph(L.Callback):
    """Writes the backward graph of the run's first training step into its TensorBoard (Graphs
    dashboard), once: the step's own loss, walked in `on_before_backward`, just before backward
    frees the graph. It costs no extra forward pass and touches no number of the run (weights,
    .grad, BatchNorm statistics, RNG: tests compare the curve with and without it). During that
    one forward, module hooks and a TorchFunctionMode note which module made each node; they
    are removed right after. Nothing on a resumed run (its first attempt wrote the graph), on DDP
    ranks other than 0, or without a TensorBoard logger (logger=csv). `seconds`: the walk and
    the write."""

    def __init__(self, recorder, resumed: bool = False):
        self.recorder, self.resumed = recorder, resumed
        self.seconds: float | None = None
        self._armed = not resumed  # until the first training batch
        self._scopes: _Scopes | None = None
        self._handles: list = []
        self._eager = None  # torch.compiler.set_stance's context while the step is watched

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._armed:
            return
        self._armed = False
        if trainer.is_global_zero and self.recorder.writer is not None:
            # model.compile=true: this one step runs eagerly (torch.compile's own switch), so
            # the graph shows autograd's nodes, and dynamo never traces the hooks and mode
            # below (it would compile a fragment per module for this step alone)
            self._eager = torch.compiler.set_stance("force_eager")
            self._scopes = _Scopes()
            self._handles = self._scopes.install(pl_module.model, mode_in_forward=True)

    def on_before_backward(self, trainer, pl_module, loss):
        if self._scopes is None:
            return
        scopes, self._scopes = self._scopes.scopes, None
        self._remove_hooks()
        t0 = time.perf_counter()
        model = pl_module.model
        graph = walk(loss, dict(model.named_parameters()), dict(model.named_buffers()),
                     resident_tensors(trainer), scopes)
        write_graph(self.recorder.writer, graph_def(graph))
        self.seconds = time.perf_counter() - t0

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._scopes = [], None
        if self._eager is not None:  # the stance before this step, back
            self._eager.__exit__(None, None, None)
            self._eager = None

    def on_exception(self, trainer, pl_module, exception):
        self._remove_hooks()  # a first step that never reached backward

    def teardown(self, trainer, pl_module, stage):
        self._remove_hooks()


def resident_tensors(trainer=None, loader=None, datamodule=None) -> list[torch.Tensor]:
    """The data set's resident tensors (batches are slices or gathers of them): a trainer's,
    or a train loader's and data module's."""
    if trainer is not None:
        loader, datamodule = trainer.train_dataloader, trainer.datamodule
    found = [getattr(loader, "x", None), getattr(loader, "y", None),
             *(getattr(datamodule, "tensors", None) or {}).values()]
    return [t for t in found if isinstance(t, torch.Tensor)]


def first_batch(cfg) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(x, y, resident): a run's first training batch, taken and prepared as the run does it
    (the data module's train loader: a gather when shuffled; normalised, augmented), and the
    resident tensors it comes from."""

    datamodule = CIFARDataModule(cfg.data, cfg.seed, tensors=load_split_tensors(cfg.data))
    loader = datamodule.train_dataloader()
    batch = next(iter(loader))
    x = _prepare(batch[0], batch[2] if len(batch) == 3 else None)  # on_after_batch_transfer's
    return x, batch[1], resident_tensors(loader=loader, datamodule=datamodule)


def render(graph: Graph, out, fmt: str = "svg", title: str = "") -> tuple[list, str | None]:
    """Write DOT always, and the image when graphviz's `dot` binary is there.

    Returns (files written, a note when the image could not be rendered)."""
    import shutil
    from pathlib import Path

    out = Path(out)
    dot = graph.dot(title)
    dot_path = out.with_suffix(".dot")
    dot_path.write_text(dot.source)
    if fmt == "dot":
        return [dot_path], None
    if shutil.which("dot") is None:
        return [dot_path], (f"graphviz's dot binary is not installed; render with: "
                            f"dot -T{fmt} {dot_path} -o {out.with_suffix('.' + fmt)}")
    image = dot.render(outfile=str(out.with_suffix("." + fmt)), format=fmt, cleanup=False)
    Path(image).with_suffix(".gv").unlink(missing_ok=True)
    return [dot_path, Path(image)], None
