"""ImageNet "caffe" preprocessing as a layer, so the descriptor model takes raw RGB [0, 255]."""

import keras
from keras import ops

# BGR means of keras.applications.imagenet_utils (mode "caffe", used by ResNet v1).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="glam_tf")
class CaffePreprocess(keras.layers.Layer):
    """RGB in [0, 255] -> BGR minus the ImageNet channel means, no scaling.

    Matches keras.applications.resnet.preprocess_input (channels last).

    Call arguments:
        inputs: `(B, H, W, 3)` RGB, float (uint8 values cast to float).

    Returns:
        `(B, H, W, 3)` BGR, mean-subtracted, in the layer's compute dtype.
    """

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] != 3:
            raise ValueError(
                f"CaffePreprocess expects (B, H, W, 3) RGB images; received shape "
                f"{input_shape}.")

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        bgr = ops.flip(x, axis=-1)
        mean = ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=self.compute_dtype)
        return bgr - mean

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)
