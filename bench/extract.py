"""The extract stage per granule: chunk decoding, and what a fragment costs to store.

Decoding: each granule's chunk index is read once; then, for the three
datasets every extract decodes whole (latitude, longitude, h_li of every
beam), :func:`magg_core.granules.h5chunks.read_spans` fetches and decodes them with
h5coro-hidefix and with our zlib + numpy decoder, alternating, several
times; reported are the median times per granule and their ratio. Both must
give the same bytes (checked). Layouts: the demo sample, the real-density
cycle sample (tracks up to 2,000 km, a segment every 20 m), release 007's
100,000-row chunks, and the real NSIDC granules in /work/shared/realdata.

Fragments: the points of the real-density granules in their parents,
encoded as the extract stage stores them, with and without the height-change
columns (latitude, longitude, time), plain (``np.savez``, what magg writes)
and deflated (``np.savez_compressed``, the compact encoding considered):
bytes per point, and encode + decode time per million points.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench._common import cached_sample, machine, parser, ratio_line
from magg_core.access.s3 import S3Endpoint
from magg_core.config import load_config
from magg_core.granules.h5chunks import index_column, read_spans
from magg_core.granules.h5driver import S3Access, open_h5
from magg_core.granules.read import read_parents
from magg_core.schema import READ_DROPS
from magg_core.store.fragments import decode, encode

REAL = sorted(Path("/work/shared/realdata/atl06").glob("*.h5"))
LAYOUTS = {
    "demo": {"n_granules": 4},
    "real density": {
        "n_granules": 2,
        "centre": (-80.0, 0.0),
        "extent_km": 2000.0,
        "spacing_m": 20.0,
    },
    "r007 100k-row chunks": {"n_granules": 2, "extent_km": 2000.0, "layout": "r007"},
}
QUICK_LAYOUTS = {"demo": {"n_granules": 2, "extent_km": 200.0}}
DECODED = ("latitude", "longitude", "h_li")
ACCESS = S3Access(credentials=None, endpoint=S3Endpoint())


def decode_times(path: Path, repeats: int) -> tuple[float, float]:
    """Median seconds to fetch and decode the granule's DECODED datasets: hidefix, zlib."""
    h5 = open_h5(str(path), ACCESS)
    with h5:
        columns = [
            index_column(h5, f"{beam}/land_ice_segments/{name}")
            for beam in ("gt1l", "gt1r", "gt2l", "gt2r", "gt3l", "gt3r")
            for name in DECODED
        ]
        columns = [c for c in columns if c is not None and c.n_rows]
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(repeats):
            for hidefix in (True, False)[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                for c in columns:
                    read_spans(h5, c, [(0, c.n_rows)], hidefix=hidefix)
                times[hidefix].append(time.perf_counter() - t0)
        once = [read_spans(h5, c, [(0, c.n_rows)], hidefix=True)[0] for c in columns]
        again = [read_spans(h5, c, [(0, c.n_rows)], hidefix=False)[0] for c in columns]
    if any(a.tobytes() != b.tobytes() for a, b in zip(once, again, strict=True)):
        raise RuntimeError(f"{path.name}: the decoders disagree")
    return statistics.median(times[True]), statistics.median(times[False])


def fragment_costs(granules: list, repeats: int) -> None:
    """Bytes a point and encode + decode time, with and without height change's columns."""
    from magg_core.catalog.catalog import catalog_from_records

    full = load_config()
    plain = replace(full, height_change=None)
    catalog = catalog_from_records([g.umm for g in granules], cycle=22)
    reads = [
        read_parents(
            str(g.path),
            [p for p, gs in catalog.cells.items() if g.name in {c.name for c in gs}],
            full,
        )
        for g in granules
    ]
    points = sum(len(p) for r in reads for p in r.points.values())
    for name, config in (("with height change", full), ("variables only", plain)):
        for how, save in (("npz", np.savez), ("npz deflated", np.savez_compressed)):
            sizes, times = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                total = 0
                for r in reads:
                    for p in r.points.values():
                        if how == "npz":
                            blob = encode(p, config)
                        else:
                            buffer = io.BytesIO()
                            child = p.child_index.astype(np.uint16)
                            arrays = {c: p.columns[c] for c in config.point_columns}
                            counts = {
                                f"dropped.{k}": np.int64(p.dropped.get(k, 0)) for k in READ_DROPS
                            }
                            save(buffer, child=child, **arrays, **counts)
                            blob = buffer.getvalue()
                        decode(blob, r.url, config, config.point_columns)
                        total += len(blob)
                times.append(time.perf_counter() - t0)
                sizes.append(total)
            print(
                f"  fragments {name:>18}, {how:>12}: {sizes[0] / points:5.1f} B/point, "
                f"encode+decode {statistics.median(times) / points * 1e9:5.0f} ns/point "
                f"({points:,} points)"
            )


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    repeats = 3 if args.quick else 15
    print(machine())
    layouts = QUICK_LAYOUTS if args.quick else LAYOUTS
    ratios = []
    for name, options in layouts.items():
        granules = cached_sample(**options)
        times = [decode_times(g.path, repeats) for g in granules]
        compiled = statistics.median(t[0] for t in times) * 1000
        ours = statistics.median(t[1] for t in times) * 1000
        ratios.append(ours / compiled)
        print(f"  {name:>22}: zlib+numpy {ours:6.1f} ms, hidefix {compiled:6.1f} ms a granule")
    for path in [] if args.quick else REAL:
        compiled, ours = (t * 1000 for t in decode_times(path, repeats))
        print(f"  {path.name[:22]:>22}: zlib+numpy {ours:6.1f} ms, hidefix {compiled:6.1f} ms")
    ratio_line("extract.hidefix_decode_speedup", statistics.median(ratios), None)
    density = cached_sample(**(QUICK_LAYOUTS["demo"] if args.quick else LAYOUTS["real density"]))
    fragment_costs(density, 1 if args.quick else 3)


if __name__ == "__main__":
    main()
