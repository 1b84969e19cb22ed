"""Retrieval: document loading and chunking, a ColBERT late-interaction encoder, index backends
(``exact`` MaxSim in memory, ``plaid`` via colbert-ai) and ``PassageIndex.search() -> Passage``s.

Imports nothing heavy at import time; never imports ``server/``.
"""
