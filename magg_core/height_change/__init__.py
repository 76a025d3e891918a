"""The height-change product: plan which cycles' fragments each parent needs, fit a plane
plus a linear trend per cell, write it.
"""
