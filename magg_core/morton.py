"""HEALPix/morton helpers: thin, vectorized wrappers over mortie 1.0.

Morton words are ``uint64`` everywhere: every Antarctic word is >= 2**63, so
a signed type silently wraps. Latitudes are geodetic on input; mortie turns
them into authalic latitude (its default) so cells are equal-area on WGS84.
"""

from __future__ import annotations

import mortie
import numpy as np


def point_morton(lat: np.ndarray, lon: np.ndarray, order: int) -> np.ndarray:
    """Morton word (``uint64``) of the order-``order`` cell holding each point."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.size == 0:
        return np.empty(0, dtype=np.uint64)
    return np.asarray(mortie.geo2mort(lat, lon, order=order), dtype=np.uint64)


def parent_of(morton: np.ndarray, parent_order: int) -> np.ndarray:
    """The order-``parent_order`` ancestor of each morton word."""
    morton = np.asarray(morton, dtype=np.uint64)
    if morton.size == 0:
        return morton
    return np.asarray(mortie.clip2order(parent_order, morton), dtype=np.uint64)


def children(parent_morton: int, child_order: int) -> np.ndarray:
    """The ``4**(child_order - parent_order)`` children of one parent, sorted.

    Their HEALPix nested ids are contiguous, so position in this array equals
    ``healpix_id - first_healpix_id`` (the child index used throughout magg).
    """
    return np.asarray(
        mortie.generate_morton_children(np.uint64(parent_morton), child_order), dtype=np.uint64
    )


def healpix_ids(morton: np.ndarray) -> np.ndarray:
    """HEALPix nested ids (``uint64``) of morton words that share one order."""
    morton = np.asarray(morton, dtype=np.uint64)
    if morton.size == 0:
        return np.empty(0, dtype=np.uint64)
    ids, _ = mortie.mort2healpix(morton)
    return np.asarray(ids, dtype=np.uint64)


def cell_word_problem(word: int, order: int) -> str | None:
    """Why ``word`` is not the morton word of an order-``order`` cell; ``None`` if it is.

    mortie decides (docs/architecture.md §Grid): the word must name a HEALPix cell
    (``MortonWord.order`` refuses the empty word 0 and invalid base-cell
    prefixes), at ``order``, and be that cell's canonical packing — the word
    its decimal label parses back to. The last check matters because
    mortie's decode ignores bits below a word's order: such a word names the
    same cell as the canonical one but can match no chunk of the store.
    """
    if not 0 <= word < 2**64:
        return "is not a uint64 morton word"
    try:
        cell = mortie.MortonWord(word)
        word_order = cell.order
        canonical = mortie.decimal_to_word(cell.decimal, dtype=int)
    except ValueError:
        return "is not a morton word (it names no HEALPix cell)"
    if word_order != order:
        return f"is a morton word of order {word_order}, not of order {order}"
    if canonical != word:
        return f"is not a canonical morton word (the cell's word is {canonical})"
    return None
