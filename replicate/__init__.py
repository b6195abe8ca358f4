"""Replication engine for four award-winning audio-classification solutions."""
