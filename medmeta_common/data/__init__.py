"""Site data: readers for every format, splits, harmonisation, the synthetic demo."""
