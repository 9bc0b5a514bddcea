"""The stage graph: stages are nodes, and an edge runs from the stage that writes a value to each stage that reads it.

The graph comes from what stages declare they read and write (see `opdgraph.stages`), never from table order; the
`[data]` section is the source node that writes `prompts`. `stage_order` is a deterministic topological order
(ties broken by the canonical kind order, then by name). `graph_problems` reports reads without a producer, values
with two producers that some stage reads, and cycles, each naming both ends.
"""

from __future__ import annotations

import attrs
import networkx as nx

DATA_NODE = "data"
DATA_WRITES = ("prompts",)


@attrs.frozen
class StageNode:
    name: str
    kind: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]


def build_stage_graph(nodes: list[StageNode]) -> nx.DiGraph:
    """Nodes carry their StageNode as `node`; each edge carries the values it passes as `values`."""
    graph = nx.DiGraph()
    for node in [StageNode(DATA_NODE, DATA_NODE, (), DATA_WRITES), *nodes]:
        graph.add_node(node.name, node=node)
    producers = _producers(graph)
    for consumer in graph.nodes:
        for value in graph.nodes[consumer]["node"].reads:
            for producer in producers.get(value, []):
                if graph.has_edge(producer, consumer):
                    graph.edges[producer, consumer]["values"].append(value)
                else:
                    graph.add_edge(producer, consumer, values=[value])
    return graph


def _producers(graph: nx.DiGraph) -> dict[str, list[str]]:
    producers: dict[str, list[str]] = {}
    for name in graph.nodes:
        for value in graph.nodes[name]["node"].writes:
            producers.setdefault(value, []).append(name)
    return producers


def graph_problems(graph: nx.DiGraph, writers_by_kind: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(stage name, message) for every read without a producer, doubly produced value, and cycle."""
    problems = []
    producers = _producers(graph)
    for name in graph.nodes:
        node = graph.nodes[name]["node"]
        for value in node.reads:
            if value not in producers:
                kinds = [kind for kind, writes in writers_by_kind.items() if value in writes]
                hint = f"; add a [{kinds[0]}] table (kind {kinds[0]!r} writes it)" if kinds else ""
                problems.append((name, f"[{name}] reads {value!r} but no stage writes it{hint}"))
    readers = {value for name in graph.nodes for value in graph.nodes[name]["node"].reads}
    for value, names in sorted(producers.items()):
        if len(names) > 1 and value in readers:
            listed = " and ".join(f"[{name}]" for name in names)
            problems.append((names[1], f"{value!r} is written by both {listed}; each value needs one producer"))
    # simple_cycles may start a cycle anywhere; rotate each to its smallest name so messages are deterministic
    cycles = [cycle[cycle.index(min(cycle)):] + cycle[:cycle.index(min(cycle))] for cycle in nx.simple_cycles(graph)]
    for cycle in sorted(cycles):
        path = " -> ".join(f"[{name}]" for name in [*cycle, cycle[0]])
        problems.append((cycle[0], f"stages form a cycle: {path}"))
    return problems


def stage_order(graph: nx.DiGraph, kind_rank: dict[str, int]) -> list[str]:
    """A deterministic topological order of stage names (the data node excluded)."""
    def tie_break(name: str):
        return (kind_rank.get(graph.nodes[name]["node"].kind, -1), name)
    return [name for name in nx.lexicographical_topological_sort(graph, key=tie_break) if name != DATA_NODE]
