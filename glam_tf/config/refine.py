"""RefineConfig: training-free search-time refinements of global descriptors, each off by default.

- alpha-query expansion (alpha-QE, Radenovic et al., TPAMI 2019): the query becomes the
  L2-normalised sum of itself and its top-n neighbours weighted by similarity^alpha, and
  is searched again.
- database-side augmentation (alpha-DBA): each database descriptor is replaced the same
  way by its top-k database neighbours (an offline pass over the database).
- SuperGlobal re-ranking of the top M (Shao et al., ICCV 2023, the authors' released
  MDescAug + RerankwMDA).
glam_tf.eval.refine computes them; eval_main's flags are these fields.
"""

from __future__ import annotations

import dataclasses

from glam_tf.config.settings import check, integer, number, setting, to_json

_POSITIVE = number(0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Which search-time refinements run, and their parameters (field names = flag names)."""

    query_expansion: bool = setting(False, "alpha-query expansion: search again with the "
                                    "L2-normalised sum of the query and its top "
                                    "--qe_neighbors weighted by similarity^--qe_alpha.")
    qe_neighbors: int = setting(2, "alpha-QE: database neighbours added to the query (n).",
                                rule=integer(1))
    qe_alpha: float = setting(3.0, "alpha-QE: a neighbour's weight is max(similarity, "
                              "0)^alpha.", rule=number(0.0))
    database_augmentation: bool = setting(False, "alpha-DBA: replace each database "
                                          "descriptor by the L2-normalised sum of itself and "
                                          "its top --dba_neighbors database neighbours "
                                          "weighted by similarity^--dba_alpha (an offline "
                                          "pass over the whole database, chunked).")
    dba_neighbors: int = setting(2, "alpha-DBA: database neighbours added to each database "
                                 "descriptor (k, itself excluded).", rule=integer(1))
    dba_alpha: float = setting(3.0, "alpha-DBA: a neighbour's weight is max(similarity, "
                               "0)^alpha.", rule=number(0.0))
    rerank: bool = setting(False, "SuperGlobal re-ranking (global descriptors only) of each "
                           "query's top --rerank_m; later positions keep their order.")
    rerank_m: int = setting(400, "Re-ranking: top M re-ordered.", rule=integer(2))
    rerank_k: int = setting(9, "Re-ranking: K neighbours (among the M) refining each of the "
                            "M, and K+1 best refined descriptors forming the expansion "
                            "vector (the authors' code counts the image itself).",
                            rule=integer(1))
    rerank_beta: float = setting(0.15, "Re-ranking: weight factor of a neighbour's "
                                 "similarity in the refined descriptors (the image itself "
                                 "weighs 1).", rule=_POSITIVE)

    def validate(self, names=None) -> None:
        """Raises SettingError naming the setting's flag, the rule and the value."""
        check(self, names)

    @property
    def enabled(self) -> tuple:
        """Names of the refinements that run, in the order they apply."""
        return tuple(name for name, on in (("database_augmentation", self.database_augmentation),
                                           ("query_expansion", self.query_expansion),
                                           ("rerank", self.rerank)) if on)

    def info(self) -> dict:
        """The refinements that ran with their parameters (for the results JSON)."""
        params = to_json(self)
        out = {}
        for name, prefix in (("database_augmentation", "dba_"), ("query_expansion", "qe_"),
                             ("rerank", "rerank_")):
            if getattr(self, name):
                out[name] = {k[len(prefix):]: v for k, v in params.items()
                             if k.startswith(prefix)}
        return out
