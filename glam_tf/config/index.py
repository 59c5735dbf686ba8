"""IndexConfig: the settings of a search-index SavedModel (storage, request limits, DBA).

glam_tf.search_index builds the index; build_index_main's flags are these fields.
"""

from __future__ import annotations

import dataclasses

from glam_tf.config.settings import check, integer, number, one_of, setting, to_json

# Storage of the database descriptors; scores are always accumulated in float32.
INDEX_STORAGES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """What a search index stores and what its signatures refuse.

    memory_budget_mb bounds one request's temporaries: the database is scored in chunks of
    rows whose (B, rows) float32 scores (and, with reduced-precision storage, the chunk's
    float32 copy) fit it, whatever B and the database size.
    """

    storage: str = setting("float32", "Storage of the database descriptors: float32, or "
                           "bfloat16 / float16 (half the memory; scores accumulated in "
                           "float32).", rule=one_of(INDEX_STORAGES))
    max_k: int = setting(1000, "Most neighbours one request may ask for (k).", rule=integer(1))
    max_queries: int = setting(256, "Most query descriptors in one search_from_descriptors "
                               "request (search_from_bytes takes the export's "
                               "max_images_per_request).", rule=integer(1))
    memory_budget_mb: int = setting(64, "Temporaries of one request's database product, MiB "
                                    "(the chunk length follows from it and B).",
                                    rule=integer(1))
    query_expansion: bool = setting(False, "alpha-QE in every request: each query is "
                                    "searched again as the L2-normalised sum of itself and "
                                    "its top --qe_neighbors weighted by similarity^--qe_alpha.")
    qe_neighbors: int = setting(2, "alpha-QE: database neighbours added to the query (n).",
                                rule=integer(1))
    qe_alpha: float = setting(3.0, "alpha-QE: a neighbour's weight is max(similarity, "
                              "0)^alpha.", rule=number(0.0))
    rerank: bool = setting(False, "SuperGlobal re-ranking in every request, in the graph: "
                           "each query's top --rerank_m re-ordered "
                           "(glam_tf.eval.refine.superglobal_rerank; after alpha-QE when "
                           "both are on); later positions keep their order.")
    rerank_m: int = setting(400, "Re-ranking: top M re-ordered (at most the index size).",
                            rule=integer(2))
    rerank_k: int = setting(9, "Re-ranking: K neighbours (among the M) refining each of the "
                            "M.", rule=integer(1))
    rerank_beta: float = setting(0.15, "Re-ranking: weight factor of a neighbour's "
                                 "similarity.", rule=number(0.0, low_open=True))
    database_augmentation: bool = setting(False, "alpha-DBA baked into the stored "
                                          "descriptors: each becomes the L2-normalised sum of "
                                          "itself and its top --dba_neighbors database "
                                          "neighbours weighted by similarity^--dba_alpha.")
    dba_neighbors: int = setting(2, "alpha-DBA: database neighbours added to each descriptor "
                                 "(itself excluded).", rule=integer(1))
    dba_alpha: float = setting(3.0, "alpha-DBA: a neighbour's weight is max(similarity, "
                               "0)^alpha.", rule=number(0.0))

    def validate(self, names=None) -> None:
        """Raises SettingError naming the setting's flag, the rule and the value."""
        check(self, names)

    def info(self) -> dict:
        """The settings as recorded in the index's glam_index.json."""
        return to_json(self)
