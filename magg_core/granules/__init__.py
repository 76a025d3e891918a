"""ATL06 granules as bytes: h5coro with our own driver and chunk index, reading only the
ranges a cell needs, and the synthetic granules of the built-in sample.
"""
