"""The backward graph of a loss: nodes, edges, leaves named by parameter, saved tensors.

`walk(loss, params, buffers, resident)` follows grad_fn -> next_functions down to AccumulateGrad
(as torchviz's make_dot does) and lists, for each node, the tensors it saved for backward
(`_saved_*` attributes, or `saved_tensors` for a custom Function).

What backward keeps alive is counted per storage (a tensor saved twice, or as two views, keeps
its storage alive once, and whole), leaving out the storages that outlive the graph anyway:
parameters, buffers and the resident data set (`outliving`). A batch that is a slice of the
resident set shares its storage and costs nothing; a shuffled batch is a gather, its own storage,
and counts (SmallNet at batch 32: 921,604 bytes, the labels' 256 among them). `SavedBytes` is
that rule applied with `torch.autograd.graph.saved_tensors_hooks` (the tensors backward
unpacks): the one counter behind run.json's `memory.saved_for_backward_bytes` (memory.py) and
`autograd-lab graph`'s hook count (`saved_bytes_by_hooks`), the oracle for the walk's count.
`first_batch` is a run's first training batch, built as the run builds it, so `graph` counts
what a run counts.

For TensorBoard's Graphs dashboard: `module_scopes` records which module's forward made each
node, `graph_def` turns a walk into a GraphDef with '/' scopes by module, `write_graph` puts it
in a run's event file, and the `TensorBoardGraph` callback does all of it once per run, on the
run's first training step (no extra forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's memory: its storage. Saved twice, or as two views, it is kept
    alive once, and whole."""
    return t.untyped_storage().data_ptr()


def size_text(n: int) -> str:
    """Bytes as a person reads them: `12 B`, `3.5 KiB`, `1.20 MiB` (never `0.0 KiB`)."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.2f} MiB"


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def storage_bytes(tensors) -> dict[int, int]:
    """{storage: bytes} of the tensors' storages, each once: the one rule every byte figure
    counts by (a tensor's memory is its storage, whole; two views of it are one)."""
    return {_key(t): _bytes(t) for t in tensors if isinstance(t, torch.Tensor)}


@dataclass
class Graph:
    nodes: list[dict] = field(default_factory=list)  # id, name, module, param, saved, saved_bytes
    edges: list[tuple[int, int]] = field(default_factory=list)  # (node, its next function)
    saved: dict[int, tuple[str, int]] = field(default_factory=dict)  # storage -> (where, bytes)
    state: set[int] = field(default_factory=set)  # storages of parameters and buffers
    resident: set[int] = field(default_factory=set)  # storages of the resident data set

    def counts(self, key: int) -> bool:
        """Whether a saved storage is kept alive by the graph alone."""
        return key not in self.state and key not in self.resident

    @property
    def saved_bytes(self) -> int:
        """What backward alone keeps alive: saved storages that are neither model state
        (parameters, buffers) nor resident data."""
        return sum(b for k, (_, b) in self.saved.items() if self.counts(k))

    @property
    def total_bytes(self) -> int:
        """Every storage the graph references, model state and resident data included."""
        return sum(b for _, b in self.saved.values())

    def table(self):
        import pandas as pd

        return pd.DataFrame(self.nodes)

    def dot(self, title: str = ""):
        """A graphviz.Digraph: leaves (parameters) blue, nodes that keep tensors orange."""
        import graphviz

        g = graphviz.Digraph(graph_attr={"label": title, "rankdir": "BT"},
                             node_attr={"shape": "box", "style": "filled", "fontsize": "10"})
        for n in self.nodes:
            label = n["param"] or n["name"]
            if n["saved_bytes"]:
                label += f"\\nsaves {size_text(n['saved_bytes'])}"
            color = "lightblue" if n["param"] else ("orange" if n["saved_bytes"] else "white")
            g.node(str(n["id"]), label, fillcolor=color)
        for a, b in self.edges:
            g.edge(str(b), str(a))
        return g


def _saved_tensors(node) -> list[tuple[str, torch.Tensor]]:
    out = []
    for attr in dir(node):
        if attr.startswith("_saved_"):
            try:
                value = getattr(node, attr)
            except RuntimeError:  # freed after backward
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            out += [(attr[7:], v) for v in values if isinstance(v, torch.Tensor)]
    if not out and hasattr(node, "saved_tensors"):  # a custom autograd.Function
        try:
            out = [(f"saved_tensors[{i}]", t) for i, t in enumerate(node.saved_tensors)]
        except RuntimeError:
            pass
    return out


def walk(loss: torch.Tensor, params: dict[str, torch.Tensor] | None = None,
         buffers: dict[str, torch.Tensor] | None = None, resident=(),
         scopes: dict | None = None) -> Graph:
    """`params` names the leaves; `params`, `buffers` and `resident` (the data set's tensors)
    outlive the graph: what they share is not counted as saved. `scopes` ({node: module name},
    from `module_scopes`) places each node in a module; a node it does not know (made inside a
    composite op) takes the module of the node that leads to it, a parameter's leaf its own."""
    names = {id(p): n for n, p in (params or {}).items()}
    scopes = scopes or {}
    graph, ids, stack = Graph(), {}, [(loss.grad_fn, "")]
    graph.state = {_key(t) for t in [*(params or {}).values(), *(buffers or {}).values()]}
    graph.resident = {_key(t) for t in resident}
    while stack:
        node, outer = stack.pop()
        if node is None or node in ids:
            continue
        ids[node] = len(ids)
        variable = getattr(node, "variable", None)
        param = names.get(id(variable)) if variable is not None else None
        module = param.rpartition(".")[0] if param else scopes.get(node, outer)
        saved = _saved_tensors(node)
        fresh, described = 0, []
        for attr, t in saved:
            key, size = _key(t), _bytes(t)
            if key not in graph.saved:
                graph.saved[key] = (f"{type(node).__name__}.{attr}", size)
                fresh += size if graph.counts(key) else 0
            why = ("" if graph.counts(key) else
                   " (model state, not counted)" if key in graph.state else
                   " (resident data, not counted)")
            described.append(f"{attr}: {tuple(t.shape)} {str(t.dtype)[6:]} {size} B{why}")
        graph.nodes.append({"id": ids[node], "name": type(node).__name__, "module": module,
                            "param": param, "saved": "; ".join(described),
                            "saved_bytes": fresh})
        for child, _ in node.next_functions:
            if child is not None:
                stack.append((child, module))
    for node, i in ids.items():
        for child, _ in node.next_functions:
            if child is not None:
                graph.edges.append((i, ids[child]))
    return graph


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def outliving(model: nn.Module | None = None, resident=()) -> set[int]:
    """The storages that live as long as the run whatever the graph does: the model's
    parameters and buffers and the resident data set's tensors. What they share is never
    counted as saved for backward."""
    state = [*model.parameters(), *model.buffers()] if model is not None else []
    return {_key(t) for t in [*state, *resident] if isinstance(t, torch.Tensor)}


class SavedBytes:
    """The one rule for the bytes the autograd graph keeps alive, applied with
    `saved_tensors_hooks`: every storage of a saved tensor once, whole, unless it is a
    parameter's (or a view of one: told by type) or in `outlive` (see `outliving`).

    `hooks()` is the context to run the step in. Training (`at_pack=False`): what backward
    unpacks, while `counting` is true (a part of the graph a detach cut off is never unpacked
    and is freed with it); validation (`at_pack=True`): what is packed, as no backward runs.
    `total` is the count. Used by run.json's figure (observe.memory.MemoryFigures) and by
    `autograd-lab graph` (saved_bytes_by_hooks), so the two count alike."""

    def __init__(self, outlive: set[int], at_pack: bool = False):
        self.outlive, self.at_pack = outlive, at_pack
        self.seen: dict[int, int] = {}  # storage address -> its size
        self.counting = True

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if self.counting and not _is_parameter(t) and _key(t) not in self.outlive:
            self.seen.update(storage_bytes([t]))
        return t  # handed back unchanged: the run's numbers are untouched

    def hooks(self):
        def same(t):
            return t

        pack, unpack = (self._keep, same) if self.at_pack else (same, self._keep)
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def saved_bytes_by_hooks(forward, exclude=()):
    """The oracle for what backward keeps alive, counted without walking the graph.

    Runs `forward()` under `saved_tensors_hooks` and returns (loss, backward): calling
    `backward()` runs loss.backward() and returns the bytes of the unique storages of the saved
    tensors that backward unpacked, leaving out parameters (and views of them: told by their
    type, not by a list) and the storages of the tensors in `exclude` (buffers, the resident
    data set). Tensors saved by a part of the graph that a detach cut off are never unpacked,
    so they do not count (they are freed with that part). Walk the graph before calling it:
    backward frees the saved tensors.
    """
    counter = SavedBytes(outliving(resident=exclude))
    counter.counting = False  # a walk before backward unpacks too: only backward's count
    with counter.hooks():
        loss = forward()

    def backward() -> int:
        counter.counting = True
        loss.backward()
        return counter.total

    return loss, backward
