"""Kafka I/O on confluent-kafka: config, source, sink, admin and the embedded broker.

Knows nothing of models or frameworks.
"""

from tensorstream.kafka.admin import KafkaAdmin, TopicInfo
from tensorstream.kafka.broker import BrokerError, EmbeddedBroker, embedded_broker, find_broker_binary
from tensorstream.kafka.config import KafkaConfig
from tensorstream.kafka.sink import DeliveryError, DeliveryTimeout, FailedDelivery, KafkaSink
from tensorstream.kafka.source import TP, ConsumeError, KafkaSource, Record

__all__ = [
    "BrokerError", "ConsumeError", "DeliveryError", "DeliveryTimeout", "EmbeddedBroker", "FailedDelivery", "KafkaAdmin",
    "KafkaConfig", "KafkaSink", "KafkaSource", "Record", "TP", "TopicInfo", "embedded_broker",
    "find_broker_binary",
]
