"""Synthetic landmarks: procedural facades photographed under varied viewpoint, light, occlusion.

A seeded, deterministic stand-in for GLDv2 + revisited Oxford, small enough to generate in
seconds, so the demo and tests run the real code paths (GLDv2 csv -> TFRecords -> pipeline;
revisited gnd pickle -> evaluation) without downloads.

A landmark is a structure: building outline, roof (gable, dome, towers, spire, mansard,
stepped, flat), a window grid (count, shape, skipped cells, frames, mullions), door, portico
columns, floor bands and a wall texture (brick, stone blocks, bands, ribs, stucco). By default
colour is NOT part of the landmark: every photo draws a fresh palette, so mean colour says
nothing about identity; only structure does (`palette_variation` < 1 keeps some of each
building's own colours). A photo applies a homography (viewpoint, rotation, scale,
crop), illumination (gain, colour cast, gradient shadow, gamma), occluders (trees, poles,
vehicles, signs), blur, noise and JPEG compression. Street scenes (`frame_scale` > 1,
`neighbours` > 0) photograph the landmark smaller, between buildings drawn per photo from a
pool shared by every landmark, so the photo holds more than the landmark, as real ones do.

Output under `root`:
  train_clean.csv, train/<a>/<b>/<c>/<id>.jpg      GLDv2 layout (16-hex ids, sparse landmark ids)
  synth/jpg/<name>.jpg, synth/gnd_synth.pkl         revisited layout, dataset name "synth"
  synth_val/jpg/<name>.jpg, synth_val/gnd_synth_val.pkl
                                                    the same for the validation split
                                                    (num_val_landmarks > 0)
  synthetic_manifest.json                           parameters, landmark of every image
  .synthetic_complete.json                          marker, written last

Test landmarks (queries and their database photos) and distractor landmarks are disjoint from
the training landmarks; so are the validation split's (drawn like the training ones, held out
of training, to choose settings on without looking at the test split). Queries are separate photos (not in the database) with a box around
the building; database photos of the query's landmark are easy, hard or junk by how strong the
change is (mild viewpoint/occlusion -> easy; strong -> hard; extreme or mostly occluded -> junk).

Modules: `scene` (a landmark's structure, palettes, noise), `photo` (photographing a scene at
a difficulty level), `writer` (the dataset on disk, in gldv2's and testsets' layouts).
"""

from glam_tf.data.synthetic.photo import Photo, render_photo
from glam_tf.data.synthetic.scene import LandmarkScene, render_scene
from glam_tf.data.synthetic.writer import (DATASET_NAME, MANIFEST_NAME, MARKER_NAME,
                                           VAL_DATASET_NAME, SyntheticSummary,
                                           generate_if_absent, generate_synthetic_landmarks,
                                           image_id)

__all__ = [
    "DATASET_NAME", "LandmarkScene", "MANIFEST_NAME", "MARKER_NAME", "Photo",
    "SyntheticSummary", "VAL_DATASET_NAME", "generate_if_absent",
    "generate_synthetic_landmarks", "image_id", "render_photo", "render_scene",
]
