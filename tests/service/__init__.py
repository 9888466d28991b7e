"""Tests of monitor/service/: the Kafka side of liqmon (most of them need the broker)."""
