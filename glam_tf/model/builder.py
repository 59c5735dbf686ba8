"""build_descriptor_model: image -> preprocessing -> backbone -> GLAM -> GeM -> head;
inference_model: the same layers with training-free inference options (GeM p, regional
GeM); all_layers: every layer of a built model, nested ones included."""

import keras

from glam_tf.model.backbone import build_backbone
from glam_tf.config.model import ModelConfig
from glam_tf.model.glam import GlamModule
from glam_tf.model.head import EmbeddingHead
from glam_tf.model.pooling import GeM, RegionalGeM
from glam_tf.model.preprocessing import CaffePreprocess


def build_descriptor_model(config: ModelConfig) -> keras.Model:
    """Builds the global-descriptor model of the spec ("Placement and head").

    Args:
        config: a ModelConfig; validated first.

    Returns:
        keras.Model, input "image" float32 `(B, H, W, 3)` RGB in [0, 255] (any H, W >= 32),
        output float32 `(B, embedding_dim)` unit rows. Sublayers "preprocess",
        "backbone", "glam" (absent for variant "baseline"), "gem", "head".
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_descriptor_model expects a ModelConfig; received "
                        f"{type(config).__name__}.")
    config.validate()
    image = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = CaffePreprocess(name="preprocess")(image)
    x = build_backbone(config.backbone, config.weights, model_name="backbone",
                       zero_init_residual=config.zero_init_residual)(x)
    if config.variant != "baseline":
        x = glam_module(config)(x)
    x = GeM(p=config.gem_p, eps=config.gem_eps, name="gem")(x)
    x = EmbeddingHead(config.embedding_dim, dropout=config.dropout, name="head")(x)
    name = "glam_" + config.variant.replace("+", "_").replace("-", "_")
    return keras.Model(image, x, name=name)


def glam_module(config: ModelConfig) -> GlamModule:
    """The GLAM layer ("glam") of a model config whose variant is not "baseline"."""
    return GlamModule(config.variant, reduced_channels=config.reduced_channels,
                      kernel_size=config.kernel_size, dilations=tuple(config.dilations),
                      zero_init_attention=config.zero_init_attention,
                      fusion_identity_weight=config.fusion_identity_weight,
                      fusion_lr_multiplier=config.fusion_lr_multiplier,
                      global_spatial_logit_scale=config.global_spatial_logit_scale,
                      local_spatial_activation=config.local_spatial_activation,
                      name="glam")


def inference_model(model: keras.Model, *, gem_p: float = 0.0,
                    regional_gem: bool = False) -> keras.Model:
    """`model` with training-free inference options (SuperGlobal, Shao et al., ICCV 2023).

    The trained layers are reused (same weights): image -> "preprocess" -> "backbone" ->
    "glam" (if any) -> ["regional_gem": RegionalGeM, when asked] -> "gem" (a fixed-p GeM
    when `gem_p` is set, else the trained one) -> "head".

    Args:
        model: a build_descriptor_model model (layers named as there).
        gem_p: GeM exponent at inference (>= 1); 0 keeps the trained p.
        regional_gem: insert RegionalGeM (p 2.5, 5 x 5) before GeM.

    Returns:
        `model` itself when no option is set, else a new keras.Model named
        `<name>_inference`.
    """
    if not gem_p and not regional_gem:
        return model
    names = [layer.name for layer in model.layers]
    missing = [n for n in ("preprocess", "backbone", "gem", "head") if n not in names]
    if missing:
        raise ValueError(f"inference options (gem_p={gem_p}, regional_gem={regional_gem}) "
                         f"need a build_descriptor_model model with layers preprocess, "
                         f"backbone, gem, head; model {model.name!r} lacks {missing}. Leave "
                         "them unset for other models.")
    trained_gem = model.get_layer("gem")
    image = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = model.get_layer("preprocess")(image)
    x = model.get_layer("backbone")(x)
    if "glam" in names:
        x = model.get_layer("glam")(x)
    if regional_gem:
        x = RegionalGeM(name="regional_gem")(x)
    pool = (GeM(p=gem_p, eps=trained_gem.eps, trainable_p=False, name="gem") if gem_p
            else trained_gem)
    x = model.get_layer("head")(pool(x))
    return keras.Model(image, x, name=model.name + "_inference")


def all_layers(root: keras.layers.Layer) -> list:
    """Every layer of `root`, itself first, then depth first; each layer once.

    The children of a layer are the layers of `keras.Model.layers` (the nodes of a
    functional or Sequential model) and the layers held by its public attributes, alone
    or in a list, tuple or dict (how glam_tf layers hold their sublayers, e.g.
    `EmbeddingHead.bn`, `LocalSpatialAttention.dilated_convs`). Keras 3 has no public
    recursive walk over sublayers (`Layer._flatten_layers` is private).

    Args:
        root: a keras layer or model.

    Returns:
        list of keras.layers.Layer.
    """
    seen, order = set(), []

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        order.append(layer)
        children = list(layer.layers) if isinstance(layer, keras.Model) else []
        for name, value in vars(layer).items():
            if name.startswith("_"):
                continue
            items = value.values() if isinstance(value, dict) else (
                value if isinstance(value, (list, tuple)) else (value,))
            children.extend(item for item in items if isinstance(item, keras.layers.Layer))
        for child in children:
            visit(child)

    visit(root)
    return order
