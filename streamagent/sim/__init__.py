"""The simulated shop and everything that plays it: its MDP and optimum, the shop through
Kafka, and the demo. Not production code: the product never imports this package (bench and
the CLI's simulate/demo commands do)."""
