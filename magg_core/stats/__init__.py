"""Pure statistics over one parent cell's points: per-child aggregation and the coarser
pyramid levels, all from one sort. No I/O.
"""
