"""What the Zarr v3 store holds and how it is written: the template and a cell's chunks
(:mod:`.arrays`), durable per-cell records, fragments kept between stages, the coarse
levels' staging objects, and bounded reads of many small objects.
"""
