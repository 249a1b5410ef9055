"""BERT MLM for the TF engine: keras-hub's BertBackbone sized by the same presets as the torch model,
and keras-hub's MaskedLMHead tied to the token embedding. Batches are the MLMSource dicts the torch
driver uses (same masks for the same seed); the loss is over the masked positions only."""
from __future__ import annotations

import keras
import keras_hub
import tensorflow as tf

from hpctrain.models.names import BERT_SIZES

IGNORE = -100


def build_bert(preset: str, vocab_size: int, max_positions: int, dropout: float = 0.1) -> keras.Model:
    layers, hidden, heads, inter = BERT_SIZES[preset]
    backbone = keras_hub.models.BertBackbone(vocabulary_size=vocab_size, num_layers=layers, num_heads=heads,
                                             hidden_dim=hidden, intermediate_dim=inter, dropout=dropout,
                                             max_sequence_length=max_positions)
    head = keras_hub.layers.MaskedLMHead(token_embedding=backbone.token_embedding, intermediate_activation="gelu",
                                         name="mlm_head")
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    segments = keras.Input((None,), dtype="int32", name="segment_ids")
    padding = keras.Input((None,), dtype="int32", name="padding_mask")
    positions = keras.Input((None,), dtype="int32", name="mask_positions")
    seq = backbone({"token_ids": ids, "segment_ids": segments, "padding_mask": padding})["sequence_output"]
    logits = keras.layers.Activation("linear", dtype="float32")(head(seq, mask_positions=positions))
    return keras.Model([ids, segments, padding, positions], logits, name=f"bert_{preset}")


class MaskedLM:
    """batch = MLMSource dict (input_ids, attention_mask, token_type_ids, labels); cross-entropy over
    the masked positions; stats [loss x masked tokens, correct, masked tokens]."""

    def __call__(self, model, batch, training: bool):
        ids = tf.cast(batch["input_ids"], tf.int32)
        positions = tf.broadcast_to(tf.range(tf.shape(ids)[1]), tf.shape(ids))  # every position; masked below
        logits = model([ids, tf.cast(batch["token_type_ids"], tf.int32), tf.cast(batch["attention_mask"], tf.int32),
                        positions], training=training)
        labels = batch["labels"]
        sel = tf.not_equal(labels, IGNORE)
        target = tf.boolean_mask(labels, sel)
        picked = tf.boolean_mask(logits, sel)
        count = tf.cast(tf.size(target), tf.float64)
        per_token = keras.losses.sparse_categorical_crossentropy(target, picked, from_logits=True)
        loss = tf.reduce_sum(per_token) / tf.maximum(tf.cast(tf.size(target), tf.float32), 1.0)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(picked, -1, output_type=target.dtype), target), tf.float64))
        return loss, tf.stack([tf.cast(loss, tf.float64) * count, correct, count])
