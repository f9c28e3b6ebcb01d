"""The backward graph of a loss: nodes, edges, leaves named by parameter, saved tensors.

`walk(loss, params)` follows grad_fn -> next_functions down to AccumulateGrad (as torchviz's
make_dot does) and lists, for each node, the tensors it saved for backward (`_saved_*`
attributes, or `saved_tensors` for a custom Function): what backward keeps alive.
`saved_bytes_by_hooks(fn)` counts the same thing independently, with
`torch.autograd.graph.saved_tensors_hooks` (the tensors backward unpacks), as the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's memory: its storage. Saved twice, or as two views, it is kept
    alive once, and whole."""
    return t.untyped_storage().data_ptr()


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@dataclass
class Graph:
    nodes: list[dict] = field(default_factory=list)     # id, name, kind, param, saved, bytes
    edges: list[tuple[int, int]] = field(default_factory=list)  # (from node, to node)
    saved: dict[int, tuple[str, int]] = field(default_factory=dict)  # storage -> (where, bytes)
    state: set[int] = field(default_factory=set)  # storages of parameters and buffers

    @property
    def saved_bytes(self) -> int:
        """Everything the graph references for backward, parameters and buffers included."""
        return sum(b for _, b in self.saved.values())

    @property
    def activation_bytes(self) -> int:
        """What backward alone keeps alive: saved tensors that are not model state."""
        return sum(b for k, (_, b) in self.saved.items() if k not in self.state)

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
                label += f"\\nsaves {n['saved_bytes'] / 1024:.1f} KiB"
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
         buffers: dict[str, torch.Tensor] | None = None) -> Graph:
    """`params` names the leaves; `params` and `buffers` are model state, kept alive anyway."""
    names = {id(p): n for n, p in (params or {}).items()}
    graph, ids, stack = Graph(), {}, [loss.grad_fn]
    graph.state = {_key(t) for t in [*(params or {}).values(), *(buffers or {}).values()]}
    while stack:
        node = stack.pop()
        if node is None or node in ids:
            continue
        ids[node] = len(ids)
        variable = getattr(node, "variable", None)
        saved = _saved_tensors(node)
        fresh = 0
        for attr, t in saved:
            key = _key(t)
            if key not in graph.saved:
                graph.saved[key] = (f"{type(node).__name__}.{attr}", _bytes(t))
                fresh += _bytes(t)
        graph.nodes.append({
            "id": ids[node], "name": type(node).__name__,
            "param": names.get(id(variable)) if variable is not None else None,
            "saved": "; ".join(f"{a}: {tuple(t.shape)} {str(t.dtype)[6:]} {_bytes(t)} B"
                               for a, t in saved),
            "saved_bytes": fresh})
        for child, _ in node.next_functions:
            if child is not None:
                stack.append(child)
    for node, i in ids.items():
        for child, _ in node.next_functions:
            if child is not None:
                graph.edges.append((i, ids[child]))
    return graph


def saved_bytes_by_hooks(forward):
    """The oracle for what backward keeps alive, counted without walking the graph.

    Runs `forward()` under `saved_tensors_hooks` and returns (loss, backward): calling
    `backward()` runs loss.backward() and returns the bytes of the unique saved tensors that
    backward unpacked. Tensors saved by a part of the graph that a detach cut off are never
    unpacked, so they do not count (they are freed with that part). Walk the graph before
    calling it: backward frees the saved tensors.
    """
    seen: dict[int, int] = {}  # storage address -> its size, counted here on its own
    in_backward = [False]

    def unpack(t):
        if in_backward[0]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        loss = forward()

    def backward() -> int:
        in_backward[0] = True
        loss.backward()
        return sum(seen.values())

    return loss, backward


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
