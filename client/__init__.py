"""The hospital side: the site client (Flower ClientApp), local training, adapt and predict.

Nothing in this package sends images, labels or per-record gradients anywhere; the
only thing a site returns to the server is built in :mod:`client.app`.
"""
