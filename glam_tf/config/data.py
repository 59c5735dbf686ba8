"""DataConfig (the training input pipeline) and SyntheticConfig (the synthetic landmarks)."""

from __future__ import annotations

import dataclasses
import math

from glam_tf.config.settings import (NONEMPTY, Rule, check, fail, integer, is_int, number,
                                     numbers_list, reachable, setting, to_json)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training input settings (defaults: Yokoo et al.'s recipe, GLAM_SPEC "Training recipe").

    crop_scale: zoom s ~ U[1 - crop_scale, 1 + crop_scale]: s >= 1 crops a random window of
    1/s of the image side; s < 1 shrinks the whole image to s of the frame at a random place,
    the border filled with the image's mean colour. Then resized to the group size.
    """

    file_pattern: str = setting("", "Glob of the training TFRecords (glam_tf.data.gldv2 "
                                "converter output, DELG keys).")
    global_batch_size: int = setting(64, "Images per step over all replicas and workers.",
                                     rule=integer(1), fix="The paper uses 64.")
    size_scale: float = setting(1.0, "Scales the aspect-ratio bucket sizes (multiples of 32, "
                                "at least 32; 1.0: 352..512 px; 0.25: ~128 px).",
                                rule=number(0.0, low_open=True),
                                fix="1.0 keeps the paper's 352..512-px buckets; 0.25 gives "
                                "~128 px.")
    aspect_edges: tuple = setting((0.67, 0.77, 1.33, 1.5), "Increasing h/w edges of the "
                                  "aspect-ratio groups: group i holds edges[i-1] <= h/w < "
                                  "edges[i].", rule=numbers_list(), kind="floats")
    bucket_sizes: tuple = setting(((512, 352), (512, 384), (448, 448), (384, 512), (352, 512)),
                                  "WIDTHxHEIGHT of each aspect group (len(aspect_edges) + 1 "
                                  "entries).", kind="sizes")
    crop_scale: float = setting(0.2, "Random zoom 1 +- crop_scale (a window of 1/s of the side "
                                "for s >= 1, the image shrunk into the frame for s < 1).",
                                rule=number(0.0, 1.0, high_open=True))
    brightness: float = setting(0.1, "Random brightness +- this (0..1 units).",
                                rule=number(0.0, 1.0))
    shuffle_buffer: int = setting(1000, "Records in the shuffle buffer (encoded bytes, ~100 KB "
                                  "each for GLDv2).", rule=integer(1))
    seed: int = setting(0, "Seeds file order, record shuffle and augmentation.",
                        rule=integer())
    deterministic: bool = setting(False, "Keep decoded records in stream order (reproducible "
                                  "batches, slower).")
    skip_damaged_records: bool = setting(
        False, "Train on the valid records of damaged TFRecord shards (bad framing or data "
        "CRCs), leaving out and counting only the damaged spans; off: refuse to start and "
        "list every damaged shard, offset and problem; also skips (and counts) records whose "
        "label is outside [0, num_classes), which are refused otherwise.")
    max_decoded_pixels: int = setting(
        2**25, "Largest training image (height * width, read from its encoded header before "
        "decoding); larger records are dropped and counted, not decoded. 2**25 px = 100 MB "
        "of RGB per decode in flight (8192 x 4096; GLDv2 photos are ~800 px).",
        rule=integer(1))
    max_undecodable_run: int = setting(
        1000, "Consecutive records that may fail to decode (or be dropped) before training "
        "stops with an error: a shard set from which nothing decodes fails within this "
        "many records instead of looping forever.", rule=integer(1))

    def validate(self, names=None) -> None:
        """Raises SettingError naming the setting's flag, the rule and the value."""
        names = names or {}
        name = lambda field: names.get(field, field)  # noqa: E731
        check(self, names)
        edges = tuple(self.aspect_edges)
        if any(b <= a for a, b in zip(edges, edges[1:])):
            fail(name("aspect_edges"), "must be strictly increasing", edges)
        sizes = self.bucket_sizes
        if (not isinstance(sizes, (tuple, list))
                or any(len(s) != 2 or not all(is_int(v) and v >= 1 for v in s)
                       for s in sizes)):
            fail(name("bucket_sizes"), "entries must be WIDTHxHEIGHT positive integers",
                 sizes)
        if len(sizes) != len(edges) + 1:
            fail(name("bucket_sizes"), f"needs len(aspect_edges) + 1 = {len(edges) + 1} "
                 "entries", ",".join(f"{w}x{h}" for w, h in sizes))

    def scaled_bucket_sizes(self) -> tuple:
        """(width, height) per group after `size_scale`: multiples of 32, at least 32."""
        return tuple(
            tuple(max(32, int(math.floor(v * self.size_scale / 32.0 + 0.5)) * 32) for v in size)
            for size in self.bucket_sizes)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic landmark set (glam_tf.data.synthetic): what is generated, and where."""

    root: str = setting("", "Folder of the synthetic landmark set; generated there when "
                        "absent, reused when complete.", rule=NONEMPTY,
                        fix="Name the folder to generate into (e.g. data/synth).")
    num_train_landmarks: int = setting(100, "Training classes.", rule=integer(1))
    images_per_landmark: int = setting(15, "Training photos per class (training needs >= 2: "
                                       "a class needs several views).", rule=integer(1))
    num_test_landmarks: int = setting(10, "Test landmarks (queries + database), disjoint from "
                                      "the training ones.", rule=integer(1))
    queries_per_landmark: int = setting(5, "Query photos per test landmark (not in the "
                                        "database).", rule=integer(1))
    database_per_landmark: tuple = setting(
        (5, 4, 3), "easy,hard,junk database photos per test landmark.", kind="ints",
        rule=Rule("must be three counts easy,hard,junk >= 0 with at least one photo",
                  lambda v: len(v) == 3 and all(is_int(x) and x >= 0 for x in v)
                  and sum(v) >= 1))
    num_distractor_landmarks: int = setting(20, "Landmarks only in the test database.",
                                            rule=integer(0))
    images_per_distractor: int = setting(4, "Photos per distractor landmark.",
                                         rule=integer(0))
    image_size: int = setting(224, "Longer side of the synthetic photos, pixels (x U(0.7, "
                              "1)); >= 32, the backbone's minimum.", rule=integer(32))
    palette_variation: float = setting(
        1.0, "How far each photo's building colours move from its landmark's own palette "
        "towards a random one, in [0, 1] (1: colour is no cue; 0: only illumination and "
        "occluders change them).", rule=number(0.0, 1.0))
    num_val_landmarks: int = setting(
        0, "Validation landmarks: drawn like the training ones, held out of training and "
        "disjoint from the test ones, written as the revisited split synth_val (same query and "
        "database counts, distractors of its own): settings are chosen there, never on the "
        "test split.", rule=integer(0))
    frame_scale: float = setting(
        1.0, "How many times wider than the default framing each photo's view is around the "
        "landmark (2: the building spans about half the photo's width, a quarter of its "
        "area); the view beyond it shows sky, ground and the neighbour buildings.",
        rule=number(1.0, 4.0))
    neighbours: int = setting(
        0, "Buildings beside the landmark on each side, drawn per photo from the clutter "
        "pool, shared by every landmark (training, validation and test): pooling the "
        "whole photo sees them, attention can leave them out.", rule=integer(0, 3))
    clutter_pool: int = setting(
        8, "Buildings the neighbours are drawn from (their own structure and colours, "
        "never a landmark's); few means the same neighbours appear beside many landmarks.",
        rule=integer(1))
    occlusion_scale: float = setting(
        1.0, "Multiplies the fraction of the building each photo's occluders (trees, poles, "
        "vehicles, signs) aim to cover (at most 0.9).", rule=number(0.0, 3.0))
    illumination: float = setting(
        1.0, "Multiplies each photo's illumination change (gain, colour cast per channel, "
        "gamma, gradient shadow): 2 doubles their spread, so a building's colours differ "
        "more between its photos; 0 lights every photo alike.", rule=number(0.0, 4.0))
    position_jitter: float = setting(
        0.0, "Moves the camera off the building by up to this fraction of the view's width "
        "and height (uniform, per photo): 0.25 puts the building's centre anywhere in the "
        "middle half of the photo, so a photo's centre is no cue (parts of it may leave "
        "the frame).", rule=number(0.0, 0.5))
    zoom_jitter: float = setting(
        0.0, "Scales each photo's view by exp(U(-z, z)) on top of its level's zoom: the "
        "building's size in the frame varies by that factor each way (0.5: x0.61 to x1.65).",
        rule=number(0.0, 1.0))
    seed: int = setting(0, "Generator seed; same seed, same bytes.", rule=integer())

    def validate(self, names=None) -> None:
        """Raises SettingError naming the setting's flag, the rule and the value."""
        check(self, names)
        reachable((names or {}).get("root", "root"), self.root)

    def generator_params(self) -> dict:
        """The settings that decide the generated bytes (all but root), JSON-able."""
        d = to_json(self)
        del d["root"]
        for field in dataclasses.fields(self):
            if field.type == "float":  # 1 and 1.0 are one setting (the marker compares)
                d[field.name] = float(d[field.name])
        return dict(sorted(d.items()))
