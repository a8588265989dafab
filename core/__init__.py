"""Torch-free building blocks every castbook package may use: atomic writes, the JSONL ledger rule,
canonical JSON, digests, the cache home and the error types.

`core` imports nothing else of castbook, and never torch: a fully cached run and `castbook plan`
use only it and `schemas`.
"""
