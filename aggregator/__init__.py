"""The aggregator service of the distributed rate limiter.

It consumes the usage stream from Kafka, keeps windowed global usage per client, allocates quota
grants and publishes them back to the servers. ``aggregator.cli`` is the ``drl`` command line.
"""
