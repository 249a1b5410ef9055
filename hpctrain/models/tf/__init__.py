"""Keras 3 models for the TensorFlow engine, built from keras-hub backbones (no download)."""
