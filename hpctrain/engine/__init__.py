"""Training engines: PyTorch now (engine/torch.py), TensorFlow later."""
