"""streamagent: real-time coupon decisions with online Q-learning on Apache Kafka."""

__version__ = "0.1.0"
