"""Data in and out: WebDataset tar shards, their manifest, and the streaming reader.

This package knows nothing of `pretrain` or `downstream` (imports flow one way).
"""
