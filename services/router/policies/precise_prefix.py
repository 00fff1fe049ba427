"""Precise prefix: llm-d's inference scheduler, weighted scorers and a max-score picker, on the event-fed index.

Sources: llm-d's well-lit path "precise prefix cache aware routing" (llm-d/llm-d
guides/precise-prefix-cache-aware/README.md and its scheduler values file: the EndpointPickerConfig
scoring with precise-prefix-cache-scorer 2.0, kv-cache-utilization-scorer 1.0, queue-scorer 1.0, then
max-score-picker); the scorers as llm-d-inference-scheduler (docs/architecture.md: precise-prefix-cache-
scorer) and the Gateway API Inference Extension (queue-scorer, kv-cache-utilization-scorer) define them.

Per request, over the candidates:

    score(w) = prefix_weight * prefix(w) + kv_usage_weight * (1 - kv_usage(w)) + queue_weight * queue(w)
               highest wins

    prefix(w)    m(w) = the leading prompt blocks w holds (index_match, pending claims included), plus
                 host_tier_hit_weight x the blocks it holds on its host tier right after them.
                 Over the holders H = {w : m(w) > 0}, min-max normalised:
                   (m(w) - min_H m) / (max_H m - min_H m), or 1 when every holder matches as much;
                 0 for a worker that holds no block of the prompt
    queue(w)     q(w) = num_waiting(w): the engine's waiting queue plus the router's in-flight placements
                   (max q - q(w)) / (max q - min q), or 1 for all when every q is equal
    kv_usage(w)  the snapshot's fraction of KV blocks referenced by requests (vllm:kv_cache_usage_perc)

Each term is in [0, 1]. The prefix normalisation is the scorer's as published in its code (longest
leading match per pod, min-max over the pods that match at all); the guide describes the score more
loosely as the fraction of the prompt's blocks resident. So a sole holder scores 1 however short its
match, and the shorter of two holders scores 0, like a worker holding nothing.

Differences from llm-d: ties go to the earliest candidate (llm-d's picker chooses at random among the
highest); the queue term counts the router's in-flight placements, as every policy here sees them
(llm-d reads the scraped vLLM gauge), while kv_usage is the last snapshot's, as llm-d scrapes it.
Holders that are not candidates are ignored.

Tunables (PrecisePrefixConfig), the guide's weights:
  prefix_weight    2.0   precise-prefix-cache-scorer (3.0 in the guide's earlier releases)
  kv_usage_weight  1.0   kv-cache-utilization-scorer (2.0 earlier)
  queue_weight     1.0   queue-scorer (2.0 earlier)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.router.load import LoadView
from services.router.policies.base import Decision, Policy, PrefillRequest, least_cost


@dataclass(frozen=True)
class PrecisePrefixConfig:
    prefix_weight: float = 2.0
    kv_usage_weight: float = 1.0
    queue_weight: float = 1.0


def prefix_scores(candidates: Sequence[str], index_match: Mapping[str, float]) -> dict[str, float]:
    """prefix(w): matched blocks min-max normalised over the candidates that hold any."""
    held = {w: index_match.get(w, 0) for w in candidates if index_match.get(w, 0) > 0}
    if not held:
        return dict.fromkeys(candidates, 0.0)
    lo, hi = min(held.values()), max(held.values())
    return {w: (1.0 if hi == lo else (held[w] - lo) / (hi - lo)) if w in held else 0.0 for w in candidates}


def weighted_blocks(
    request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int]
) -> Mapping[str, float]:
    """m(w): device blocks plus host_tier_hit_weight x host-tier blocks; index_match itself without host blocks."""
    if not request.host_match:
        return index_match
    weight = request.host_tier_hit_weight
    return {w: index_match.get(w, 0) + weight * request.host_match.get(w, 0) for w in candidates}


def queue_scores(num_waiting: Mapping[str, int]) -> dict[str, float]:
    """queue(w): the shortest queue scores 1, the longest 0, linear between; 1 for all when equal."""
    lo, hi = min(num_waiting.values()), max(num_waiting.values())
    return {w: 1.0 if hi == lo else (hi - q) / (hi - lo) for w, q in num_waiting.items()}


class PrecisePrefix(Policy):
    name = "precise_prefix"

    def __init__(self, config: PrecisePrefixConfig = PrecisePrefixConfig()) -> None:
        self.prefix_weight = config.prefix_weight
        self.kv_usage_weight = config.kv_usage_weight
        self.queue_weight = config.queue_weight

    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        matched = weighted_blocks(request, candidates, index_match)
        score = self.scores(candidates, matched, load)
        worker = least_cost(candidates, {w: -s for w, s in score.items()})
        return Decision(worker, "cache_hit" if matched.get(worker, 0) > 0 else "max_score")

    def scores(self, candidates: Sequence[str], index_match: Mapping[str, float], load: LoadView) -> dict[str, float]:
        """score(w) of every candidate, from its matched blocks (host-tier ones already weighted)."""
        loads = {w: load.get(w) for w in candidates}
        prefix = prefix_scores(candidates, index_match)
        queue = queue_scores({w: loads[w].num_waiting for w in candidates})
        return {
            w: self.prefix_weight * prefix[w]
            + self.kv_usage_weight * (1.0 - loads[w].kv_usage)
            + self.queue_weight * queue[w]
            for w in candidates
        }
