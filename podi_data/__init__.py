"""Data shipped with QuickReduce: canned WCS solutions (``wcs``) and bad-pixel regions (``bpm``).

In the source tree they live in the top-level folders ``wcs/`` and ``bpm/``; the
installed package maps them here so that ``importlib.resources`` finds them.
"""
