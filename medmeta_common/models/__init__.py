"""Models: the shared encoder (travels) and the site-local task heads (never leave a site)."""
