"""Eviction policies, chosen by name in config.

``make_policy("lru")`` builds one. A policy module is imported only when its
name is asked for; adding a policy means adding a module and a line to
``_POLICIES``.
"""

from __future__ import annotations

import importlib

from kvstore.eviction.base import EvictionPolicy

# name -> "module:Class", imported lazily.
_POLICIES: dict[str, str] = {
    "lru": "kvstore.eviction.lru:LRUPolicy",
    "lfu": "kvstore.eviction.lfu:LFUPolicy",
    "s3fifo": "kvstore.eviction.s3fifo:S3FIFOPolicy",
    "arc": "kvstore.eviction.arc:ARCPolicy",
    "prefix-lru": "kvstore.eviction.prefix_lru:PrefixLRUPolicy",
    "prefix-lfuda": "kvstore.eviction.prefix_lfuda:PrefixLFUDAPolicy",
    "prefix-slru": "kvstore.eviction.prefix_slru:PrefixSLRUPolicy",
    "prefix-lhd": "kvstore.eviction.prefix_lhd:PrefixLHDPolicy",
    "adaptive": "kvstore.eviction.adaptive:AdaptivePolicy",
}

# The service's default: no single policy wins on every workload and size, so
# it follows whichever of its experts does best on the traffic it serves
# (kvstore/eviction/adaptive.py). Numbers: bench/hitrate.py, issue 11's note.
DEFAULT_POLICY = "adaptive"


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def make_policy(name: str, **options: object) -> EvictionPolicy:
    """A new policy instance of the given name; unknown names list the known ones."""
    target = _POLICIES.get(name)
    if target is None:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {policy_names()}")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**options)


__all__ = ["EvictionPolicy", "make_policy", "policy_names", "DEFAULT_POLICY"]
