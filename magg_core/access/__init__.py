"""Reaching S3: temporary NSIDC credentials (Earthdata login, refreshed before they lapse) and
the obstore stores that granule reads and store writes share.

The lowest folder: it knows no stage.
"""
