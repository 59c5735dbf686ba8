"""The converter's output folder as a tensorflow-datasets dataset (metadata only, no copy).

`write_metadata(output_dir)` adds TFDS's dataset_info.json and features.json beside the
shards glam_tf.data.gldv2 wrote (`train-00000-of-00008.tfrecord`, the template
`{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}`), with each split's shard lengths from the converter's
reports, so that

    tfds.builder_from_directory(output_dir).as_dataset(split="train")

yields the records the project's reader (glam_tf.data.records.parse_example) reads, nested
as TFDS writes a slashed key (`image/class/label` -> ["image"]["class"]["label"]).
`split_files` gives a split's files and example count from that metadata (read without
TFDS, so on any file system), for `--data_source=tfds` (glam_tf.train.data).
"""

from __future__ import annotations

from glam_tf import files

FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
DATASET_NAME = "glam_gldv2"
INFO_FILE = "dataset_info.json"


def features():
    """The TFDS features of a DELG-keyed example (glam_tf.data.records): one scalar tensor per
    key, nested at each '/' as TFDS serialises nested features."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from glam_tf.data import records  # pylint: disable=g-import-not-at-top

    tree = {}
    for key, spec in records.FEATURE_SPEC.items():
        *parents, leaf = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tfds.features.Tensor(shape=(), dtype=spec.dtype)

    def build(node):
        return tfds.features.FeaturesDict(
            {k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

    return build(tree)


def flatten(example: dict, prefix: str = "") -> dict:
    """A nested TFDS example as the flat `image/...` keys of records.FEATURE_SPEC."""
    out = {}
    for key, value in example.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def write_metadata(output_dir: str, shard_lengths: dict) -> None:
    """Writes TFDS's metadata for the converted shards in `output_dir`.

    TFDS writes it in a local scratch folder (holding empty files under the shards' names:
    it lists the folder to learn the template), from where each file is copied to
    `output_dir` under a temporary name and renamed, on any tf.io.gfile file system (TFDS's
    own paths know local folders and object stores, not `ram://`).

    Args:
      output_dir: the converter's output folder.
      shard_lengths: split name -> [(shard file name, records)] in shard order; splits
        without shards are left out.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    scratch = files.scratch_dir("glam_tf_tfds_")
    try:
        split_infos = []
        for split, shards in shard_lengths.items():
            if not shards:
                continue
            for name, _ in shards:
                files.write_bytes_atomic(files.join(scratch, name), b"")
            split_infos.append(tfds.core.SplitInfo(
                name=split, shard_lengths=[n for _, n in shards],
                num_bytes=sum(files.getsize(files.join(output_dir, name))
                              for name, _ in shards),
                filename_template=_template(scratch, split)))
        tfds.folder_dataset.write_metadata(
            data_dir=scratch, features=features(), split_infos=split_infos,
            filename_template=_template(scratch, None), check_data=False,
            description="Google Landmarks v2 converted by glam-tf (DELG feature keys).")
        for name in files.listdir(scratch):
            if name.endswith(".json"):
                files.write_bytes_atomic(files.join(output_dir, name),
                                         files.read_bytes(files.join(scratch, name)))
    finally:
        files.rmtree(scratch)


def _template(folder: str, split):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds.core.ShardedFileTemplate(
        data_dir=folder, template=FILENAME_TEMPLATE, dataset_name=DATASET_NAME,
        split=split, filetype_suffix="tfrecord")


def is_tfds_folder(folder: str) -> bool:
    """Whether `folder` holds TFDS metadata (dataset_info.json)."""
    return files.isfile(files.join(folder, INFO_FILE))


def split_files(folder: str, split: str = "train") -> tuple:
    """(sorted file paths, number of examples) of `split` as the TFDS metadata in `folder`
    (dataset_info.json) records them; read here, so on any tf.io.gfile file system.

    Raises:
      ValueError: no such split, or a file name template other than the converter's.
    """
    path = files.join(folder, INFO_FILE)
    info = files.read_json(path)
    splits = {s["name"]: s for s in info.get("splits", [])}
    if split not in splits:
        raise ValueError(f"{path}: no split {split!r} (splits: "
                         f"{', '.join(sorted(splits)) or 'none'})")
    entry = splits[split]
    template = entry.get("filepathTemplate", FILENAME_TEMPLATE)
    if template != FILENAME_TEMPLATE:
        raise ValueError(f"{path}: split {split!r} names its files {template!r}; this reader "
                         f"knows the converter's {FILENAME_TEMPLATE!r}")
    lengths = [int(n) for n in entry["shardLengths"]]
    names = [f"{split}-{i:05d}-of-{len(lengths):05d}.{info.get('fileFormat', 'tfrecord')}"
             for i in range(len(lengths))]
    return [files.join(folder, n) for n in names], sum(lengths)
