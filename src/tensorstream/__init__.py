"""tensorstream: streaming machine learning on Kafka-protocol brokers.

Online training and real-time inference with PyTorch and TensorFlow models,
one pipeline spec for either framework. See the README for the concepts.
"""

__version__ = "0.1.0"
