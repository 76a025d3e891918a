"""Stage *catalog*: CMR's granules for a cycle, the order-6 cells of a region, and which
granules touch which cell (the catalog every later stage reads).
"""
