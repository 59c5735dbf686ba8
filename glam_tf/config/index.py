"""IndexConfig: the settings of a search-index SavedModel (storage, request limits, refinements).

glam_tf.search_index builds the index; build_index_main's flags are these fields.
"""

from __future__ import annotations

import dataclasses

from glam_tf.config.refine import RefineConfig
from glam_tf.config.settings import check, integer, nested, one_of, setting, to_json

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
    refine: RefineConfig = nested(
        RefineConfig, "The refinements the index applies, with eval_main's flags: alpha-DBA "
        "baked into the stored descriptors (--database_augmentation), alpha-QE and the "
        "SuperGlobal re-ranking in every request, in the graph (--query_expansion, "
        "--rerank; QE first, as glam_tf.eval.refine.refine_and_search orders them).")

    def validate(self, names=None) -> None:
        """Raises SettingError naming the setting's flag, the rule and the value."""
        check(self, names)
        self.refine.validate()

    def info(self) -> dict:
        """The settings as recorded in the index's glam_index.json."""
        return to_json(self)
