"""Stage *extract*: read one granule once and keep its points as one fragment per parent
cell, for the grid stage and the height-change product.
"""
