"""Keras functional-API model builders, one module per source solution."""
