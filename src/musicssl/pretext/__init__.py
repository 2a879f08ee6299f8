"""Pretext tasks: pure loss functions, one module per method, and a registry that discovers them."""
