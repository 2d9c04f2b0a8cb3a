"""The operator's dashboard: a read-only web page of a run (``medmeta server dashboard``).

:mod:`.page` renders :class:`server.run_view.RunView` as one HTML page (inline SVG
learning curves, no scripts, no build step); :mod:`.serve` serves it with the
standard library, bound to localhost unless the operator exposes it with a token.
"""
