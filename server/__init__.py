"""The consortium operator's side: the aggregation server (a Flower ServerApp).

It sees encoder updates, record counts and scalar metrics — never images, labels or
per-record gradients — and applies the meta-update to the shared encoder.
"""
