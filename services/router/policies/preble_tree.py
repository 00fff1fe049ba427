"""Preble's prefix tree: the prompts the router placed, as a radix tree over their chained block hashes.

A node is a span of consecutive full blocks; its path from the root spells a prefix. Block hashes
are chained (services.common.block_hash), so two prompts agree on block j iff their hashes at j are
equal, and agreement is monotone: agreeing on block j means agreeing on every block before it. So
the common length of a prompt and a node is one comparison when they agree on the node's last
block, else a binary search, and a node's children are keyed by their first block's hash alone:

    prompt a:  h0 h1 h2 h3 h4          root ── [h0 h1 h2] ─┬─ [h3 h4]      (a's tail)
    prompt b:  h0 h1 h2 g3             (after a, then b)   └─ [g3]         (b's tail)
    prompt c:  h0 h1                   then c splits:  root ── [h0 h1] ── [h2] ─┬─ [h3 h4]
                                                                                └─ [g3]

An important node (Preble) is one longer than the context before it: num_blocks > start. The first
node under the root always is (start 0). A prompt's important node is the deepest important node on
its path; the policy keeps the statistics of its requests there (`stats`).

Recency. Inserting a prompt touches its path, its last node first and its ancestors after, so an
ancestor is never older than a descendant and the least recently used node is always a leaf.
`prune(horizon)` removes least recently used leaves touched before `horizon`, and more while the
tree holds over `max_blocks` blocks; a parent left with one child is not merged with it (a split is
only undone by pruning). Splits and removals are reported to the owner (`on_split(head, tail)`,
`on_remove(node)`), which keeps its own per-node state consistent.

Memory: each node keeps its span's hashes in a tuple (a tuple of ints, unlike a list, leaves the
garbage collector's view after its first pass); with the 64-bit ints it keeps alive that is about
40 bytes a block, plus ~300 bytes a node; max_blocks bounds it. (An array of 8-byte integers would
take 8 bytes a block but costs ~30 ns a block to fill: more than the rest of an insertion.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

S = TypeVar("S")


class PrefixNode(Generic[S]):
    __slots__ = ("children", "hashes", "parent", "start", "stats", "worker_bits")

    def __init__(self, hashes: tuple[int, ...], start: int, parent: PrefixNode[S] | None) -> None:
        self.hashes = hashes  # the span's block hashes
        self.start = start  # blocks before the span: its context
        self.parent = parent
        self.children: dict[int, PrefixNode[S]] = {}  # first block hash -> child
        self.stats: S | None = None  # the owner's statistics, on important nodes
        self.worker_bits = 0  # the owner's: workers whose recency lists hold this node

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)

    @property
    def end(self) -> int:
        """Blocks from the root to the end of this span."""
        return self.start + len(self.hashes)

    @property
    def important(self) -> bool:
        return len(self.hashes) > self.start


class PrefixTree(Generic[S]):
    def __init__(
        self,
        max_blocks: int,
        on_split: Callable[[PrefixNode[S], PrefixNode[S]], None] = lambda head, tail: None,
        on_remove: Callable[[PrefixNode[S]], None] = lambda node: None,
    ) -> None:
        self.max_blocks = max_blocks
        self.on_split = on_split
        self.on_remove = on_remove
        self.root: PrefixNode[S] = PrefixNode((), 0, None)
        self.num_blocks = 0
        self._recency: OrderedDict[PrefixNode[S], float] = OrderedDict()  # every node but the root, oldest first

    def __len__(self) -> int:
        """Nodes, the root not counted."""
        return len(self._recency)

    def insert(self, block_hashes: Sequence[int], now: float) -> list[PrefixNode[S]]:
        """Add a prompt; its path (the root's child first), ending at a node that ends with the prompt.

        Empty for a prompt without a full block. At most one node is split and one leaf added.
        """
        path: list[PrefixNode[S]] = []
        node, i, num_blocks = self.root, 0, len(block_hashes)
        while i < num_blocks:
            child = node.children.get(block_hashes[i])
            if child is None:
                leaf: PrefixNode[S] = PrefixNode(tuple(block_hashes[i:]), i, node)
                node.children[block_hashes[i]] = leaf
                self.num_blocks += num_blocks - i
                path.append(leaf)
                break
            common = _common_blocks(child.hashes, block_hashes, i)
            if common < child.num_blocks:
                child = self._split(child, common)
            path.append(child)
            node, i = child, i + common
        self._touch(path, now)
        return path

    def prune(self, horizon: float) -> None:
        """Remove the least recently used leaves touched before `horizon`, and more while over max_blocks."""
        recency = self._recency
        while recency:
            node = next(iter(recency))
            if (recency[node] >= horizon and self.num_blocks <= self.max_blocks) or node.children:
                return  # (a node with children is never the oldest: see the module doc)
            del recency[node]
            parent = node.parent
            assert parent is not None
            del parent.children[node.hashes[0]]
            self.num_blocks -= node.num_blocks
            node.parent = None
            self.on_remove(node)

    def nodes(self) -> list[PrefixNode[S]]:
        """Every node but the root, least recently used first (for tests and reference checks)."""
        return list(self._recency)

    def _split(self, node: PrefixNode[S], num_head_blocks: int) -> PrefixNode[S]:
        """Cut `node` after its first num_head_blocks blocks: a new parent (returned) takes them."""
        parent = node.parent
        assert parent is not None
        head: PrefixNode[S] = PrefixNode(node.hashes[:num_head_blocks], node.start, parent)
        node.hashes = node.hashes[num_head_blocks:]
        node.start += num_head_blocks
        node.parent = head
        parent.children[head.hashes[0]] = head
        head.children[node.hashes[0]] = node
        self._recency[head] = self._recency[node]  # as recent as its child, at least
        self.on_split(head, node)
        return head

    def _touch(self, path: list[PrefixNode[S]], now: float) -> None:
        recency = self._recency
        for node in reversed(path):  # the last node first: ancestors end up more recent
            recency[node] = now
            recency.move_to_end(node)


def _common_blocks(span: tuple[int, ...], block_hashes: Sequence[int], offset: int) -> int:
    """How many leading blocks of `span` equal block_hashes[offset:] (at least 1: the first is known equal)."""
    limit = min(len(span), len(block_hashes) - offset)
    if span[limit - 1] == block_hashes[offset + limit - 1]:
        return limit
    agree, differ = 0, limit - 1  # indices known to agree and to differ
    while differ - agree > 1:
        mid = (agree + differ) // 2
        if span[mid] == block_hashes[offset + mid]:
            agree = mid
        else:
            differ = mid
    return agree + 1
