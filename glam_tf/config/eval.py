"""EvalConfig: one retrieval evaluation (test set, model, extraction, search, outputs)."""

from __future__ import annotations

import dataclasses
import importlib.util

from glam_tf.config import contract
from glam_tf.config.export import INFERENCE_OPTIONS, ExportConfig
from glam_tf.config.refine import RefineConfig
from glam_tf.config.settings import (NONEMPTY, SettingError, check, fail, integer, names_of,
                                     nested, number, numbers_list, one_of, reachable, setting)

DATASETS = contract.REVISITED + contract.ORIGINAL
STAGES = ("all", "extract", "evaluate")
# Which global spatial attention is drawn: G_s is (HW, HW), a[m, n] = weight of position
# m in the output at position n (softmax over m). "mean": the mean over n (how much each
# position is attended on average); "center": the column of the centre position n.
ATTENTION_POSITIONS = ("mean", "center")
_SCALES_RULE = numbers_list()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (field names = eval_main flag names)."""

    dataset: str = setting("", "Test set.", rule=one_of(DATASETS))
    data_root: str = setting("", "Folder holding <dataset>/ (jpg/ + ground truth).",
                             rule=NONEMPTY, fix="Name the folder holding the dataset.")
    output_dir: str = setting("", "Where features, results JSON and pictures go.",
                              rule=NONEMPTY, fix="Name a folder for features and results.")
    model: str = setting("", "SavedModel directory (numbered version folder or parent).")
    train_dir: str = setting("", "Training directory (model_config.json + checkpoints/), "
                             "instead of --model.")
    distractors: bool = setting(False, "Add the revisitop1m distractors (roxford5k/rparis6k).")
    distractors_root: str = setting("", "Folder holding revisitop1m/ (default: data_root).")
    max_image_size: int = setting(contract.DEFAULT_MAX_IMAGE_SIZE, "Longer side of full "
                                  "images after the client resize (query crops keep that "
                                  "scale).", rule=integer(1))
    scales: tuple = setting(None, "Multi-scale factors; empty = the model's own (a "
                            "SavedModel's export-time scales, else 0.70710678,1,1.41421356). "
                            "Other scales than a SavedModel's export-time ones go through its "
                            "serving_default signature, one image per call.", kind="floats")
    batch_size: int = setting(8, "Images per model call (same resized size only). Batching "
                              "pays on accelerators; on a 2-core CPU bench/extract.py measured "
                              "batch 8 at 0.7-1.0x the one-at-a-time speed, so use 1 there.",
                              rule=integer(1))
    shard_size: int = setting(1000, "Images per feature shard file.", rule=integer(1))
    num_shards: int = setting(1, "Hosts sharing the extraction.", rule=integer(1))
    shard_index: int = setting(0, "This host's index in [0, num_shards).", rule=integer(0))
    num_workers: int = setting(2, "Image decoding threads.", rule=integer(1))
    stage: str = setting("all", "all: extract then evaluate; extract: only this host's "
                         "shards; evaluate: merge (checks completeness), search and score.",
                         rule=one_of(STAGES))
    topk: int = setting(100, "Neighbours per query stored in the results JSON.",
                        rule=integer(1))
    visualize: tuple = setting((), "Query indices or names to draw with their top 10.",
                               kind="strings")
    visualize_attention: bool = setting(
        False, "Also draw, for the --visualize queries and their top 5, the image with the "
        "local spatial attention A_s^l and the global spatial attention G_s overlaid "
        "(<output_dir>/vis-<dataset>/attention.png). Needs the Keras model: --train_dir or "
        "training's in-memory model, not a SavedModel (its signatures return descriptors "
        "only).")
    attention_position: str = setting(
        "mean", "Which global spatial attention --visualize_attention draws: mean (each "
        "position's attention averaged over all output positions) or center (the "
        "attention of the centre position).", rule=one_of(ATTENTION_POSITIONS))
    search_index: str = setting("", "A search-index SavedModel (glam-build-index: a base "
                                "path or a version folder) that ranks the test set's "
                                "database instead of its extracted descriptors: the queries "
                                "are described by --model/--train_dir as usual, the index "
                                "returns its whole ranking (it must hold at most max_k "
                                "images) and the database is not extracted. Its ids are the "
                                "database image names; an image it lacks ranks last, as an "
                                "undecodable one.")
    approx_index: str = setting("", "faiss index_factory string (e.g. HNSW32) to report "
                                "approximate search recall@approx_k against exact search.")
    approx_params: str = setting("", "faiss search parameters, e.g. efSearch=128 or "
                                 "nprobe=16.")
    approx_k: int = setting(100, "k of the approximate-search recall.", rule=integer(1))
    memory_budget_mb: int = setting(0, "Search temporaries budget in MiB; 0 = automatic.",
                                    rule=integer(0))
    log_every_s: float = setting(30.0, "Progress logging interval (seconds).",
                                 rule=number(0.0, low_open=True))
    inference: ExportConfig = nested(ExportConfig, "Training-free inference options of the "
                                     "model (GeM p, regional GeM, scale aggregation) for a "
                                     "--train_dir; a SavedModel has its own, fixed at "
                                     "export (glam_export.json).", only=INFERENCE_OPTIONS)
    refine: RefineConfig = nested(RefineConfig, "Search-time refinements (alpha-QE, "
                                  "alpha-DBA, re-ranking), each off by default; the results "
                                  "give the metrics with and without them.")

    def validate(self, names=None, *, check_model: bool = True) -> None:
        """Raises SettingError naming the setting's flag, the rule and the value; cheap.

        check_model: also require exactly one existing model source (--model or
        --train_dir); off for an in-memory model or the evaluate stage.
        """
        names = names or {}
        name = lambda field: names.get(field, field)  # noqa: E731
        check(self, names)
        self.refine.validate({f: names.get(f, f) for f in names_of(RefineConfig)})
        inference_names = {f: names.get(f, f) for f in INFERENCE_OPTIONS}
        self.inference.validate(inference_names)
        changed = list(self.inference.inference_changes())
        if changed and self.model:
            fail(inference_names[changed[0]], "applies to a --train_dir (a SavedModel's "
                 "inference options are fixed at export: see its glam_export.json)",
                 getattr(self.inference, changed[0]),
                 "Re-export with export_main.py --" + changed[0] + ", or evaluate the "
                 "training directory.")
        if self.scales is not None and not _SCALES_RULE(self.scales):
            fail(name("scales"), _SCALES_RULE.text + " (or empty: the model's own)",
                 self.scales)
        if self.distractors and self.dataset not in ("roxford5k", "rparis6k"):
            fail(name("distractors"), "goes with roxford5k or rparis6k (revisitop1m)",
                 self.distractors, f"The dataset is {self.dataset!r}.")
        if not self.shard_index < self.num_shards:
            fail(name("shard_index"), f"must be in [0, --num_shards={self.num_shards})",
                 self.shard_index)
        if self.search_index and (self.refine.enabled or self.approx_index):
            fail(name("search_index"), "ranks with the index's own search; search-time "
                 "refinements and the approximate search need the database descriptors",
                 self.search_index, "Build the index with --query_expansion or "
                 "--database_augmentation instead, or leave --search_index empty.")
        if self.approx_index and importlib.util.find_spec("faiss") is None:
            fail(name("approx_index"), "needs faiss, an optional extra", self.approx_index,
                 "pip install faiss-cpu==1.15.1, or leave it empty.")
        if self.visualize_attention:
            if not self.visualize:
                fail(name("visualize_attention"), f"draws the --{name('visualize')} queries; "
                     "none are chosen", self.visualize_attention,
                     f"Add e.g. --{name('visualize')}=0,1,2.")
            if self.model:
                fail(name("visualize_attention"), f"needs the Keras model (a checkpoint), not "
                     f"the SavedModel --model={self.model}: its signatures return "
                     "descriptors only, not attention maps", self.visualize_attention,
                     "Evaluate the training directory instead: --train_dir=<the run's "
                     "folder> (its export/ sits beside checkpoints/), or leave "
                     "--visualize_attention off.")
            if self.stage != "all":
                fail(name("visualize_attention"), f"runs with --stage=all, not --stage="
                     f"{self.stage} (it needs the model and the search results at once)",
                     self.visualize_attention,
                     "Use --stage=all, or leave --visualize_attention off.")
        for field in ("output_dir", "data_root", "distractors_root", "model", "train_dir",
                      "search_index"):
            reachable(name(field), getattr(self, field))
        if check_model:
            err = contract.check_model_source(self.model, self.train_dir)
            if err:
                raise SettingError(err)

    @property
    def label(self) -> str:
        """File-name label, e.g. `roxford5k+1m`."""
        return self.dataset + ("+1m" if self.distractors else "")
