"""Prefill placement policies, one per module, all behind services.router.policies.base.Policy."""

from services.router.policies.base import Decision, Policy, PrefillRequest
from services.router.policies.kv_overlap import KvOverlap, KvOverlapConfig
from services.router.policies.least_load import LeastLoad, LeastLoadConfig
from services.router.policies.preble import Preble, PrebleConfig
from services.router.policies.precise_prefix import PrecisePrefix, PrecisePrefixConfig
from services.router.policies.prefix_affinity import PrefixAffinity, PrefixAffinityConfig
from services.router.policies.round_robin import RoundRobin

__all__ = [
    "Decision",
    "KvOverlap",
    "KvOverlapConfig",
    "LeastLoad",
    "LeastLoadConfig",
    "Policy",
    "Preble",
    "PrebleConfig",
    "PrecisePrefix",
    "PrecisePrefixConfig",
    "PrefillRequest",
    "PrefixAffinity",
    "PrefixAffinityConfig",
    "RoundRobin",
]
