"""The distributed ArcFace training step (custom loop: Keras 3 model.fit fails under MWMS).

Each worker reads a plain (checkpointable) iterator of its share of the global batch;
inside the step every local replica takes its contiguous slice of that batch, so the
global batch of a step is the same whatever the number of replicas (TF_NOTES recipe (a)).

Mixed precision: the logits and the loss are float32 under every policy (ArcFace computes
in float32). With a `keras.optimizers.LossScaleOptimizer` (mixed_float16) the step
differentiates the scaled loss, makes every replica agree on whether a gradient
overflowed, and lets the optimizer unscale, apply or skip, and adjust its scale.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from glam_tf.model import all_layers, arcface_logits


def _batchnorm_layers(model: keras.Model) -> list:
    return [layer for layer in all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization)]


def set_synchronized_batchnorm(model: keras.Model, synchronized: bool = True) -> int:
    """Sets `synchronized` on every BatchNormalization layer of `model`; returns how many.

    Keras reads the attribute at call time, so it takes effect at the next trace: batch
    statistics are then all-reduced over the replicas (the global batch).
    """
    layers = _batchnorm_layers(model)
    for layer in layers:
        layer.synchronized = synchronized
    return len(layers)


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Sets the moving-average momentum of every BatchNormalization layer; returns how many.

    Read at call time like `synchronized`: takes effect at the next trace.
    """
    layers = _batchnorm_layers(model)
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


def _agree_on_overflow(grads: list) -> list:
    """Makes the gradients of every replica non-finite if those of any replica are.

    LossScaleOptimizer decides to apply or skip from the gradients BEFORE their all-reduce
    (Keras' merge_call path reads the first local replica's): replicas that disagreed would
    either apply an all-reduced inf or, across workers, wait forever on a collective that
    the other side skipped. One scalar all-reduce settles it: if any replica's gradients
    overflowed, a NaN is added to every replica's first gradient, so all of them skip.
    """
    present = [i for i, g in enumerate(grads) if g is not None]
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(grads[i]))
                                     for i in present]))
    overflowed = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    first = present[0]
    poison = tf.where(overflowed > 0.0, float("nan"), 0.0)
    grads = list(grads)
    grads[first] = grads[first] + tf.cast(poison, grads[first].dtype)
    return grads


def unfrozen_variables(model: keras.Model, head) -> list:
    """The trainable variables of `model` and `head` outside the layer "backbone".

    What a head-only warm-up trains (--frozen_backbone_steps): GLAM, GeM, the whitening and
    the ArcFace head.
    """
    try:
        backbone = model.get_layer("backbone")
    except ValueError:
        raise ValueError(f"--frozen_backbone_steps needs a layer named 'backbone' in the model "
                         f"{model.name!r}; it has none.") from None
    frozen = {id(v) for v in backbone.trainable_variables}
    return [v for v in model.trainable_variables + head.trainable_variables
            if id(v) not in frozen]


def make_train_step(strategy: tf.distribute.Strategy, model: keras.Model, head,
                    optimizer: keras.optimizers.Optimizer, step: tf.Variable, *,
                    global_batch_size: int, local_replicas: int,
                    inject_nan_at_step: int = -1, variables=None):
    """Returns `train_step(iterator, stop) -> (loss, accuracy, stop_votes)` (a tf.function).

    One step: next worker batch -> per-replica slice -> descriptor -> ArcFace logits
    (float32) -> softmax cross-entropy averaged over the GLOBAL batch
    (tf.nn.compute_average_loss, float32) -> gradients, all-reduced (summed) by
    apply_gradients -> step += 1.

    With a LossScaleOptimizer (mixed_float16) the gradients are those of the loss times
    the dynamic scale (float16 gradients below 6e-8 would otherwise flush to zero); the
    optimizer divides them by the scale, and on any inf/NaN skips the update and halves
    the scale (the step counter still advances; the optimizer's iterations do not). The
    returned loss is the unscaled one, finite on a skipped step.

    Args:
        strategy: the distribution strategy the variables were created under.
        model: descriptor model, `(B, H, W, 3)` -> `(B, D)` unit rows.
        head: glam_tf.model.ArcFace (its `cosine`, `margin`, `scale`).
        optimizer: built (slots created) inside strategy.scope(); a
            keras.optimizers.LossScaleOptimizer turns loss scaling on.
        step: int64 step counter, incremented once per step.
        global_batch_size: images per step over all replicas.
        local_replicas: replicas of this worker (its batch is split among them).
        inject_nan_at_step: testing hook, the loss of this 1-based step becomes NaN.
        variables: the variables this step updates (default: every trainable one of
            `model` and `head`); `unfrozen_variables` for a head-only warm-up, whose
            backward pass then stops at the backbone's output.

    Returns:
        A tf.function of (iterator yielding (images (b, H, W, 3), labels (b,)), stop int32
        scalar) returning the global mean loss, the accuracy (fraction of the global
        batch whose nearest class centre is its label, without margin) and the number of
        replicas whose `stop` was set (so all workers stop at the same step).
    """
    if variables is None:
        variables = model.trainable_variables + head.trainable_variables
    loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_fn(images, labels, stop):
        ctx = tf.distribute.get_replica_context()
        local_id = ctx.replica_id_in_sync_group % local_replicas
        per_replica = tf.shape(images)[0] // local_replicas
        begin = local_id * per_replica
        images = images[begin:begin + per_replica]
        labels = labels[begin:begin + per_replica]
        with tf.GradientTape() as tape:
            embeddings = model(images, training=True)
            cosine = head.cosine(embeddings)
            logits = arcface_logits(cosine, labels, head.margin, head.scale)
            per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(labels, tf.int32), logits=logits)
            loss = tf.nn.compute_average_loss(per_example,
                                              global_batch_size=global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.add_n([tf.cast(x, tf.float32) for x in model.losses]))
            if inject_nan_at_step > 0:
                loss = tf.where(step + 1 == inject_nan_at_step,
                                tf.constant(float("nan")), loss)
            objective = optimizer.scale_loss(loss) if loss_scaling else loss
        grads = tape.gradient(objective, variables)
        if loss_scaling:
            grads = _agree_on_overflow(grads)
        optimizer.apply_gradients(zip(grads, variables))
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(cosine, axis=-1, output_type=tf.int32),
                     tf.cast(labels, tf.int32)), tf.float32))
        # identity: a replica's own copy, so the result is per-replica (reducible).
        return loss, correct, tf.identity(stop)

    @tf.function
    def train_step(iterator, stop):
        images, labels = next(iterator)
        loss, correct, votes = strategy.run(replica_fn, args=(images, labels, stop))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        correct = strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        votes = strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)
        step.assign_add(1)
        return loss, correct / global_batch_size, votes

    return train_step
