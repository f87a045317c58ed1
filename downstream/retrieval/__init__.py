"""A FAISS retrieval index over embeddings, with per-vector metadata in SQLite.

An index folder holds index.faiss (the vectors), meta.sqlite (one metadata row per vector) and info.json (what the
vectors are), written together (`folder`). Similarity is the inner product; with `normalize=True` (the default)
vectors and queries are L2-normalised, so scores are cosine similarities. Below `exact_below` vectors the index is
exact (`Flat`); above it an inverted file `IVF{nlist},Flat` whose `nprobe` is tuned at build time to reach
`target_recall` of the exact top-k (`vectors`). Recall@k and mAP against a relevance field: `evaluate`.

Rooms: vectors (FAISS), metadata (SQLite rows), folder (files on disk), evaluate (quality), index (the face).
"""

from downstream.retrieval.errors import RetrievalError
from downstream.retrieval.evaluate import evaluate_relevance, parse_relevant, relevance_codes, select_queries
from downstream.retrieval.folder import COMPUTED_INFO, FORMAT, INDEX_NAME, INFO_NAME, META_NAME
from downstream.retrieval.index import RetrievalIndex
from downstream.retrieval.metadata import DERIVED_FIELDS, PNG_SIGNATURE, ROW_FIELDS, comparable, row_field
from downstream.retrieval.vectors import default_factory, exact_search, faiss_gpu_count, l2_normalized

__all__ = ["COMPUTED_INFO", "DERIVED_FIELDS", "FORMAT", "INDEX_NAME", "INFO_NAME", "META_NAME", "PNG_SIGNATURE",
           "ROW_FIELDS", "RetrievalError", "RetrievalIndex", "comparable", "default_factory", "evaluate_relevance",
           "exact_search", "faiss_gpu_count", "l2_normalized", "parse_relevant", "relevance_codes", "row_field",
           "select_queries"]
