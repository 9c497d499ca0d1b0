"""Framework adapters (optional extras).

Each adapter imports its framework lazily, inside its functions, so that the core
``morphonnx`` package keeps working in environments without torch/tensorflow.
"""
