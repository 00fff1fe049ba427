"""Preble's eviction cost, the part that walks caches: each worker's prefix-tree nodes, least recently
placed first, and what evicting the oldest of them would cost.

Per worker, a recency list of the tree nodes of the requests placed on it (each placement touches its
path, its last node first so that ancestors end up more recent). Evicting `need` blocks from a
worker takes its oldest nodes until their blocks cover `need`; the cost is the sum of their weights
(the owner's: an important node's load contribution on that worker, as three terms to be multiplied
by the fitted coefficients), so it is read from a prefix table:

    list (oldest first):   n0 (6 blocks)   n1 (6 blocks)   n2 (8 blocks)   ...
    table.blocks:          6               12              20
    table.weights:         w0              w0 + w1         w0 + w1 + w2
    need = 8  ->  bisect: entry 1  ->  n0 and n1 go: w0 + w1

A table covers at most `walk_nodes` nodes the worker still holds per the router's index (visiting at
most 4 × as many: the ones it no longer holds leave the list as they are met) and twice the blocks
of the query that built it. It is rebuilt when a placement touches a node in it (the node is no
longer among the oldest), when a query needs more blocks than it covers, or after `refresh_s`. A
node the tree prunes leaves the lists at once; a table that holds it keeps it until rebuilt.

The lists hold tree nodes; `PrefixNode.worker_bits` says which lists hold a node (bit = the owner's
worker bit). Single-threaded, owned by the policy.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.router.index import PrefixIndex
from services.router.policies.preble_tree import PrefixNode

S = TypeVar("S")

# A table covers this many times the blocks of the query that built it: prompts vary in length, and a
# query needing more than the table covers rebuilds it.
_COVER_FACTOR = 2

# A node's weight on a worker: (Σ weight, Σ weight·tokens, Σ weight·tokens·context) terms, or None for 0
Weights = tuple[float, float, float] | None


@dataclass(slots=True)
class _Table(Generic[S]):
    """A worker's oldest held nodes, cumulated: entry i covers nodes 0..i of its list."""

    built_at: float
    members: set[PrefixNode[S]]
    blocks: list[int]
    weights: list[float]
    token_weights: list[float]
    pair_weights: list[float]
    complete: bool = True  # it covers as much as a walk may: a bigger need does not rebuild it


class _Recency(Generic[S]):
    __slots__ = ("bit", "name", "nodes", "table")

    def __init__(self, name: str, bit: int) -> None:
        self.name = name
        self.bit = bit
        self.nodes: OrderedDict[PrefixNode[S], None] = OrderedDict()  # least recently placed first
        self.table: _Table[S] | None = None


class EvictionLists(Generic[S]):
    def __init__(self, walk_nodes: int, refresh_s: float, weights: Callable[[PrefixNode[S], int], Weights]) -> None:
        self.walk_nodes = walk_nodes
        self.refresh_s = refresh_s
        self._weights = weights  # (node, worker bit) -> its weights on that worker
        self.index: PrefixIndex | None = None  # the router's, read only: what each worker still holds
        self._lists: dict[int, _Recency[S]] = {}  # worker bit -> its list

    def touch(self, worker: str, bit: int, path: list[PrefixNode[S]]) -> None:
        """A request with this path was placed on the worker."""
        recency = self._list(worker, bit)
        nodes, table = recency.nodes, recency.table
        for node in reversed(path):  # the last node first: ancestors end up more recent
            if node in nodes:
                nodes.move_to_end(node)
                if table is not None and node in table.members:
                    recency.table = table = None
            else:
                nodes[node] = None
                node.worker_bits |= bit

    def on_split(self, head: PrefixNode[S], tail: PrefixNode[S]) -> None:
        """The tree cut `tail` after `head`: whoever caches the span caches its head (as recent as it can be)."""
        for recency in self._lists_of(tail.worker_bits):
            recency.nodes[head] = None
            head.worker_bits |= recency.bit
            if recency.table is not None and tail in recency.table.members:
                recency.table = None

    def on_remove(self, node: PrefixNode[S]) -> None:
        """The tree pruned `node`."""
        for recency in self._lists_of(node.worker_bits):
            del recency.nodes[node]
        node.worker_bits = 0

    def evicted(self, worker: str, bit: int, need_blocks: int, now: float) -> tuple[float, float, float]:
        """The summed weights of the worker's oldest nodes covering `need_blocks` (> 0) blocks."""
        table = self._table(self._list(worker, bit), need_blocks, now)
        if not table.blocks:
            return 0.0, 0.0, 0.0
        i = min(bisect.bisect_left(table.blocks, need_blocks), len(table.blocks) - 1)
        return table.weights[i], table.token_weights[i], table.pair_weights[i]

    def _table(self, recency: _Recency[S], need_blocks: int, now: float) -> _Table[S]:
        table = recency.table
        if (
            table is not None
            and now - table.built_at < self.refresh_s
            and (table.complete or table.blocks[-1] >= need_blocks)
        ):
            return table
        table = recency.table = _Table(now, set(), [], [], [], [])
        cover_blocks = _COVER_FACTOR * need_blocks
        gone: list[PrefixNode[S]] = []
        blocks, weights, token_weights, pair_weights = 0, 0.0, 0.0, 0.0
        for visited, node in enumerate(recency.nodes):
            if blocks >= cover_blocks or len(table.members) >= self.walk_nodes or visited >= 4 * self.walk_nodes:
                table.complete = blocks < cover_blocks
                break
            if self.index is not None and not self.index.holds(recency.name, node.hashes[-1]):
                gone.append(node)  # evicted there (or its claims lapsed): the list forgets it
                continue
            node_weights = self._weights(node, recency.bit)
            if node_weights is not None:
                weights += node_weights[0]
                token_weights += node_weights[1]
                pair_weights += node_weights[2]
            blocks += node.num_blocks
            table.members.add(node)
            table.blocks.append(blocks)
            table.weights.append(weights)
            table.token_weights.append(token_weights)
            table.pair_weights.append(pair_weights)
        for node in gone:
            del recency.nodes[node]
            node.worker_bits &= ~recency.bit
        return table

    def _list(self, worker: str, bit: int) -> _Recency[S]:
        recency = self._lists.get(bit)
        if recency is None:
            recency = self._lists[bit] = _Recency(worker, bit)
        return recency

    def _lists_of(self, bits: int) -> Iterator[_Recency[S]]:
        while bits:
            low = bits & -bits
            bits ^= low
            yield self._lists[low]
