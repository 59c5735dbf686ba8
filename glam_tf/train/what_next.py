"""What a finished training run prints last: where its outputs are, and what to run next.

`what_next(config, export_dir=, outputs=)` gives the text `train_main.py` prints at the end
of a run (the demo's included): the paths of the evaluation's pictures (top10.png and, with
--eval_visualize_attention, attention.png), of the SavedModel and of the results JSON, then
the commands that use them: evaluate the export, draw attention maps from the checkpoint,
export at another size. Each command writes to its own folder under the training directory,
so none of them collides with the run's own evaluation (<train_dir>/eval/step_<n>) or with
another. No TensorFlow: the text is built from the config and the paths alone.
"""

from __future__ import annotations

import shlex

from glam_tf import files
from glam_tf.config import contract

# Variants without a spatial attention map: nothing for --visualize_attention to draw.
CHANNEL_ONLY = ("baseline", "local-channel", "global-channel")
PICTURE_KEYS = {"png": "each query and its top 10; legend under the picture",
                "attention_png": "local and global spatial attention over the query and "
                                 "its top 5"}


def _path(path: str) -> str:
    """`path` relative to the working directory when it lies under it (shorter to copy)."""
    if not files.is_local(path):
        return path
    relative = files.relpath(path, ".")
    return path if relative.startswith("..") else relative


def _command(program: str, **flag_values) -> str:
    parts = ["python", program]
    for name, value in flag_values.items():
        if value is True:
            parts.append(f"--{name}")
        elif value not in (None, "", (), False):
            if isinstance(value, (tuple, list)):
                value = ",".join(str(v) for v in value)
            parts.append(f"--{name}={value}")
    return " ".join(shlex.quote(p) for p in parts)


def commands(config, export_dir) -> list:
    """[(what, command)] for a finished run of `config` (a TrainConfig)."""
    train_dir = _path(config.train_dir)
    ev, ex = config.evaluation, config.export_settings
    out = []
    eval_flags = dict(dataset=ev.dataset, data_root=ev.data_root and _path(ev.data_root),
                      max_image_size=ev.max_image_size)
    if ev.dataset and export_dir:
        out.append(("evaluate the export", _command(
            "eval_main.py", **eval_flags, model=_path(contract.export_dir(config.train_dir)),
            output_dir=files.join(train_dir, "eval_export"))))
    if ev.dataset and config.model.variant not in CHANNEL_ONLY:
        out.append(("draw attention maps (from the checkpoint)", _command(
            "eval_main.py", **eval_flags, train_dir=train_dir, scales=(1,),
            visualize=ev.visualize or (0, 1, 2), visualize_attention=True,
            output_dir=files.join(train_dir, "eval_attention"))))
    if export_dir:
        size = 2 * ex.max_image_size
        out.append((f"export at another size ({size} px, scale 1; this run exported at "
                    f"{ex.max_image_size} px)", _command(
                        "export_main.py", train_dir=train_dir,
                        export_dir=files.join(train_dir, f"export_{size}"),
                        max_image_size=size, scales=(1,))))
    return out


def what_next(config, *, export_dir=None, outputs=None) -> str:
    """The closing text of a run: output paths, then the commands that use them.

    Args:
        config: the run's TrainConfig.
        export_dir: the SavedModel version folder written, or None.
        outputs: the trained model's evaluation `outputs` ({"json", "png", "html",
            "attention_png"}), or None.
    """
    outputs = outputs or {}
    lines = ["Outputs:"]
    for key, meaning in PICTURE_KEYS.items():
        if outputs.get(key):
            lines.append(f"  picture  {_path(outputs[key])}  ({meaning})")
    if export_dir:
        lines.append(f"  export   {_path(export_dir)}  (SavedModel; TF Serving base path "
                     f"{_path(contract.export_dir(config.train_dir))})")
    if outputs.get("json"):
        lines.append(f"  results  {_path(outputs['json'])}")
    todo = commands(config, export_dir)
    if todo:
        lines.append("Next:")
        for what, command in todo:
            lines += [f"  # {what}", f"  {command}"]
    return "\n".join(lines) if len(lines) > 1 else ""
