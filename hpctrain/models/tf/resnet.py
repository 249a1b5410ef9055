"""ResNet-18/34/50/101 for the TF engine: keras-hub's ResNetBackbone (the torchvision layout: 7x7 stem,
max-pool, four stages of basic or bottleneck blocks) + global average pooling + a dense head."""
from __future__ import annotations

import keras
import keras_hub
import tensorflow as tf

from hpctrain.models.names import RESNET_BLOCKS


def build_resnet(arch: str, num_classes: int, image_size: int) -> keras.Model:
    block, counts = RESNET_BLOCKS[arch]
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=list(counts), stackwise_num_strides=[1, 2, 2, 2],
        block_type={"basic": "basic_block", "bottleneck": "bottleneck_block"}[block], use_pre_activation=False,
        image_shape=(image_size, image_size, 3))
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    # torch.nn.Linear's default init (uniform, variance 1/(3 fan_in)) rather than Glorot: the same starting
    # logit scale as the torch model (Glorot's 2.4x larger logits start ResNet-18 at a loss near 4, not 2.3).
    init = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")
    # float32 under AMP
    logits = keras.layers.Dense(num_classes, kernel_initializer=init, dtype="float32", name="fc")(x)
    return keras.Model(inputs, logits, name=arch)


class Classification:
    """batch = (images NHWC, labels); cross-entropy; stats [loss x n, correct, n] in float64."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def __call__(self, model, batch, training: bool):
        x, y = batch
        logits = tf.cast(model(x, training=training), tf.float32)
        n = tf.shape(y)[0]
        onehot = tf.one_hot(y, tf.shape(logits)[-1])
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(onehot, logits, from_logits=True,
                                                                     label_smoothing=self.label_smoothing))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float64))
        count = tf.cast(n, tf.float64)
        return loss, tf.stack([tf.cast(loss, tf.float64) * count, correct, count])
