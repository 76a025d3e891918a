"""Pipeline config: the built-in one loads, and every malformed one is named."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import yaml

from magg_core.config import ConfigError, PipelineConfig, load_config
from magg_core.expressions import Expression

BUILTIN = load_config()


def _raw() -> dict:
    return BUILTIN.to_dict()


def _stat(raw: dict, name: str) -> dict:
    return raw["aggregation"]["statistics"][name]


# --- loading -----------------------------------------------------------------


def test_builtin_config_matches_the_design():
    cfg = load_config("atl06")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == "atl06"
    assert cfg.data_source.beams == ("gt1l", "gt1r", "gt2l", "gt2r", "gt3l", "gt3r")
    assert cfg.data_source.beam_group("gt2r") == "gt2r/land_ice_segments"
    assert cfg.data_source.variables == ("h_li", "h_li_sigma")
    assert cfg.data_source.quality.dataset == "atl06_quality_summary"
    assert cfg.data_source.quality.accept == 0
    assert cfg.aggregation.coordinates == {
        "cell_ids": np.dtype("uint64"),
        "morton": np.dtype("uint64"),
    }
    assert cfg.aggregation.columns == {"weight": Expression.parse("1 / h_li_sigma**2")}
    stats = {s.name: s for s in cfg.aggregation.statistics}
    assert list(stats) == [
        "count",
        "h_min",
        "h_max",
        "h_mean",
        "h_sigma",
        "h_variance",
        "h_q25",
        "h_q50",
        "h_q75",
    ]
    assert stats["count"].dtype == np.dtype("int32") and stats["count"].fill_value == 0
    assert stats["h_mean"].weights == "weight"
    assert stats["h_sigma"].transform == Expression.parse("1 / sqrt(x)")
    assert [stats[f"h_q{p}"].q for p in (25, 50, 75)] == [0.25, 0.5, 0.75]
    for name in stats.keys() - {"count"}:
        assert stats[name].dtype == np.dtype("float32")
        assert np.isnan(stats[name].fill_value)
    assert (cfg.output.parent_order, cfg.output.child_order) == (6, 12)
    assert cfg.output.children_per_parent == 4096
    assert "{cycle}" in cfg.output.store


def test_none_and_name_give_the_same_config():
    assert load_config(None).hash == load_config("atl06").hash == BUILTIN.hash
    assert len(BUILTIN.hash) == 16


def test_loads_from_a_yaml_file(tmp_path):
    raw = _raw()
    raw["name"] = "from-file"
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    for source in (path, str(path)):
        cfg = load_config(source)
        assert cfg.name == "from-file"
        assert cfg.to_dict() == raw
        # Statistics keep the file's order (it is the order of the output arrays).
        assert [s.name for s in cfg.aggregation.statistics] == list(
            raw["aggregation"]["statistics"]
        )


def test_dict_round_trip_keeps_the_hash():
    again = load_config(BUILTIN.to_dict())
    assert again.hash == BUILTIN.hash
    assert again.to_dict() == BUILTIN.to_dict()
    assert again.aggregation.columns == BUILTIN.aggregation.columns
    assert again.output == BUILTIN.output
    assert again.data_source == BUILTIN.data_source


def test_hash_changes_with_content():
    raw = _raw()
    _stat(raw, "h_q50")["q"] = 0.5001
    assert load_config(raw).hash != BUILTIN.hash


def test_to_dict_is_strict_json_even_with_non_finite_fills():
    raw = _raw()
    _stat(raw, "h_min")["fill_value"] = math.nan
    _stat(raw, "h_max")["fill_value"] = -math.inf
    cfg = load_config(raw)
    text = json.dumps(cfg.to_dict(), allow_nan=False)  # raises on NaN/Infinity
    again = load_config(json.loads(text))
    assert again.hash == cfg.hash
    stats = {s.name: s for s in again.aggregation.statistics}
    assert np.isnan(stats["h_min"].fill_value)
    assert stats["h_max"].fill_value == -np.inf


def test_config_is_insulated_from_later_mutation_of_its_source():
    raw = _raw()
    cfg = load_config(raw)
    before = cfg.hash
    raw["output"]["child_order"] = 9
    _stat(raw, "count")["dtype"] = "int64"
    assert cfg.hash == before


def test_with_orders_changes_only_the_orders():
    cfg = BUILTIN.with_orders(6, 8)
    assert (cfg.output.parent_order, cfg.output.child_order) == (6, 8)
    assert cfg.output.children_per_parent == 16
    assert cfg.to_dict()["aggregation"] == BUILTIN.to_dict()["aggregation"]
    assert cfg.hash != BUILTIN.hash


def test_derived_columns_may_use_earlier_ones():
    raw = _raw()
    raw["aggregation"]["columns"]["weighted_h"] = "h_li * weight"
    _stat(raw, "h_mean")["column"] = "weighted_h"
    cfg = load_config(raw)
    assert list(cfg.aggregation.columns) == ["weight", "weighted_h"]


# --- malformed configs: each error names the key path and the bad value -------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_config(missing)


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("aggregation: [unclosed\n  : :")
    with pytest.raises(ConfigError, match=r"bad\.yaml.* is not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("", "NoneType")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"must be a mapping at the top level, got {kind}"):
        load_config(path)


def _mutated(change) -> dict:
    raw = copy.deepcopy(_raw())
    change(raw)
    return raw


def _drop(mapping: dict, key: str) -> None:
    del mapping[key]


MALFORMED = [
    pytest.param(
        lambda r: r.update(colour="blue"), r"^colour: unknown key \(allowed: name, ", id="top-key"
    ),
    pytest.param(
        lambda r: r["output"].update(chld_order=12),
        r"^output\.chld_order: unknown key",
        id="nested-key",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(colum="h_li"),
        r"^aggregation\.statistics\.h_min\.colum: unknown key",
        id="statistic-key",
    ),
    pytest.param(lambda r: _drop(r, "output"), r"^output: required key is missing", id="no-output"),
    pytest.param(
        lambda r: _drop(r, "data_source"),
        r"^data_source: required key is missing",
        id="no-data-source",
    ),
    pytest.param(
        lambda r: _drop(r["aggregation"], "statistics"),
        r"^aggregation\.statistics: required key is missing",
        id="no-statistics",
    ),
    pytest.param(
        lambda r: r["aggregation"].update(statistics={}),
        r"^aggregation\.statistics: at least one statistic is required",
        id="empty-statistics",
    ),
    pytest.param(
        lambda r: r.update(output=[1, 2]),
        r"^output: expected Mapping, got \[1, 2\]",
        id="section-not-mapping",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(dtype="float33"),
        r"^aggregation\.statistics\.h_min\.dtype: unknown dtype 'float33'",
        id="unknown-dtype",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(dtype="complex64"),
        r"^aggregation\.statistics\.h_min\.dtype: .*integer or float.*'complex64'",
        id="complex-dtype",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(dtype="float128"),
        r"^aggregation\.statistics\.h_min\.dtype: .*at most 64 bits, got 'float128'",
        id="float128-dtype",
    ),
    pytest.param(
        lambda r: _stat(r, "count").update(dtype="bool"),
        r"^aggregation\.statistics\.count\.dtype: .*integer or float.*'bool'",
        id="bool-dtype",
    ),
    pytest.param(
        lambda r: r["aggregation"]["coordinates"].update(morton="int64"),
        r"^aggregation\.coordinates\.morton: must be uint64 .* got int64",
        id="int64-morton",
    ),
    pytest.param(
        lambda r: r["aggregation"]["coordinates"].update(cell_ids="int64"),
        r"^aggregation\.coordinates\.cell_ids: must be uint64 .* got int64",
        id="int64-cell-ids",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(function="median"),
        r"^aggregation\.statistics\.h_min\.function: unknown function 'median' \(known: count, ",
        id="unknown-function",
    ),
    pytest.param(
        lambda r: _stat(r, "h_q25").update(q=1.5),
        r"^aggregation\.statistics\.h_q25\.q: quantile needs q in \[0, 1\], got 1\.5",
        id="q-above-one",
    ),
    pytest.param(
        lambda r: _stat(r, "h_q25").update(q=-0.1),
        r"^aggregation\.statistics\.h_q25\.q: quantile needs q in \[0, 1\], got -0\.1",
        id="q-negative",
    ),
    pytest.param(
        lambda r: _drop(_stat(r, "h_q25"), "q"),
        r"^aggregation\.statistics\.h_q25\.q: quantile needs q in \[0, 1\], got None",
        id="q-missing",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(q=0.5),
        r"^aggregation\.statistics\.h_min\.q: only function 'quantile' takes q",
        id="q-on-min",
    ),
    pytest.param(
        lambda r: _stat(r, "h_max").update(weights="weight"),
        r"^aggregation\.statistics\.h_max\.weights: only function 'mean' takes weights",
        id="weights-on-max",
    ),
    pytest.param(
        lambda r: _stat(r, "h_mean").update(weights="wieght"),
        r"^aggregation\.statistics\.h_mean\.weights: unknown column 'wieght'",
        id="unknown-weights",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(column="h_lii"),
        r"^aggregation\.statistics\.h_min\.column: unknown column 'h_lii' \(available: ",
        id="unknown-column",
    ),
    pytest.param(
        lambda r: _drop(_stat(r, "h_min"), "column"),
        r"^aggregation\.statistics\.h_min\.column: required for function 'min'",
        id="missing-column",
    ),
    pytest.param(
        lambda r: r["aggregation"]["columns"].update(weight="1 / sigma**2"),
        r"^aggregation\.columns\.weight: expression '1 / sigma\*\*2' uses unknown column\(s\) "
        r"\['sigma'\]",
        id="expression-unknown-variable",
    ),
    pytest.param(
        lambda r: r["aggregation"].update(
            columns={"early": "weight * 2", "weight": "1 / h_li_sigma**2"}
        ),
        r"^aggregation\.columns\.early: .*unknown column\(s\) \['weight'\]",
        id="column-used-before-defined",
    ),
    pytest.param(
        lambda r: r["aggregation"]["columns"].update(weight="__import__('os').system('x')"),
        r"^aggregation\.columns\.weight: expression .*calling \"__import__\('os'\)\.system\" "
        r"not allowed",
        id="unsafe-column",
    ),
    pytest.param(
        lambda r: r["aggregation"]["columns"].update(weight="h_li_sigma.__class__"),
        r"^aggregation\.columns\.weight: .*attribute access not allowed",
        id="attribute-column",
    ),
    pytest.param(
        lambda r: r["aggregation"]["columns"].update(weight=3),
        r"^aggregation\.columns\.weight: expected an expression string, got 3",
        id="column-not-string",
    ),
    pytest.param(
        lambda r: _stat(r, "h_sigma").update(transform="open('x')"),
        r"^aggregation\.statistics\.h_sigma\.transform: expression \"open\('x'\)\": "
        r"function 'open' not allowed",
        id="unsafe-transform",
    ),
    pytest.param(
        lambda r: _stat(r, "h_sigma").update(transform="1 / sqrt("),
        r"^aggregation\.statistics\.h_sigma\.transform: .*not valid syntax",
        id="syntax-transform",
    ),
    pytest.param(
        lambda r: _stat(r, "h_sigma").update(transform="x * weight"),
        r"^aggregation\.statistics\.h_sigma\.transform: may only use 'x', got 'x \* weight'",
        id="transform-other-name",
    ),
    pytest.param(
        lambda r: r["output"].update(child_order=6),
        r"^output\.child_order: need 0 <= parent_order < child_order <= 29, "
        r"got parent_order=6, child_order=6",
        id="child-equals-parent",
    ),
    pytest.param(
        lambda r: r["output"].update(child_order=4),
        r"^output\.child_order: .*got parent_order=6, child_order=4",
        id="child-below-parent",
    ),
    pytest.param(
        lambda r: r["output"].update(child_order=30),
        r"^output\.child_order: .*child_order=30",
        id="child-order-too-deep",
    ),
    pytest.param(
        lambda r: r["output"].update(parent_order="6"),
        r"^output\.parent_order: expected int, got '6'",
        id="order-as-string",
    ),
    pytest.param(
        lambda r: r["output"].update(parent_order=True),
        r"^output\.parent_order: expected int, got True",
        id="order-as-bool",
    ),
    pytest.param(
        lambda r: r["output"].update(grid="h3"),
        r"^output\.grid: unsupported grid 'h3'",
        id="grid",
    ),
    pytest.param(
        lambda r: _stat(r, "count").update(fill_value=-1.5),
        r"^aggregation\.statistics\.count\.fill_value: integer dtype int32 needs an integer "
        r"fill, got -1\.5",
        id="fractional-int-fill",
    ),
    pytest.param(
        lambda r: _stat(r, "count").update(fill_value="nan"),
        r"^aggregation\.statistics\.count\.fill_value: integer dtype int32 .*got nan",
        id="nan-int-fill",
    ),
    pytest.param(
        lambda r: _stat(r, "count").update(fill_value=2**40),
        r"^aggregation\.statistics\.count\.fill_value: fill 1099511627776 does not fit dtype int32",
        id="int-fill-overflow",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(fill_value=1e300),
        r"^aggregation\.statistics\.h_min\.fill_value: fill 1e\+300 does not fit dtype float32",
        id="float-fill-overflow",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(fill_value=10**400),
        r"^aggregation\.statistics\.h_min\.fill_value: number 1000.* is too large",
        id="huge-integer-fill",
    ),
    pytest.param(
        lambda r: _stat(r, "h_min").update(fill_value="missing"),
        r"^aggregation\.statistics\.h_min\.fill_value: expected a number, 'nan', .*'missing'",
        id="string-fill",
    ),
    pytest.param(
        lambda r: r["aggregation"]["statistics"].update(
            cell_ids={"function": "count", "dtype": "int32", "fill_value": 0}
        ),
        r"^aggregation\.statistics\.cell_ids: statistic name must be an identifier other than "
        r"a coordinate",
        id="statistic-named-like-coordinate",
    ),
    pytest.param(
        lambda r: r["data_source"].update(group="{beam.__class__}"),
        r"^data_source\.group: only '\{beam\}' may be templated, got '\{beam\.__class__\}'",
        id="group-attribute",
    ),
    pytest.param(
        lambda r: r["data_source"].update(group="{beam}/{other}"),
        r"^data_source\.group: only '\{beam\}' may be templated",
        id="group-other-field",
    ),
    pytest.param(
        lambda r: r["data_source"].update(variables=["h_li", "h-li"]),
        r"^data_source\.variables: .*identifiers, got \['h_li', 'h-li'\]",
        id="variable-not-identifier",
    ),
    pytest.param(
        lambda r: r["data_source"].update(beams=[]),
        r"^data_source\.beams: expected a non-empty list of names, got \[\]",
        id="no-beams",
    ),
    pytest.param(
        lambda r: r["data_source"].update(reader="h5py"),
        r"^data_source\.reader: unsupported reader 'h5py'",
        id="reader",
    ),
    pytest.param(
        lambda r: r["data_source"].update(fill_value=10**400),
        r"^data_source\.fill_value: number 1000.* is too large",
        id="huge-source-fill",
    ),
    pytest.param(
        lambda r: r["height_change"].update(epoch="2020"),
        r"^height_change\.epoch: unknown key \(allowed: time, height, sigma\)",
        id="height-change-unknown-key",
    ),
    pytest.param(
        lambda r: r["height_change"].update(sigma="h_sigma"),
        r"^height_change\.sigma: 'h_sigma' is not one of data_source\.variables",
        id="height-change-sigma-not-read",
    ),
    pytest.param(
        lambda r: r["height_change"].update(time="h_li"),
        r"^height_change\.time: 'h_li' is already read as another column",
        id="height-change-time-is-a-variable",
    ),
    pytest.param(
        lambda r: r["data_source"].update(variables=["h_li", "h_li_sigma", "latitude"]),
        r"^height_change\.time: data_source\.variables \['latitude'\] would clash",
        id="height-change-column-clash",
    ),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_malformed_config_names_key_and_value(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_mutated(change))


def test_malformed_yaml_file_reports_the_same_key(tmp_path):
    raw = _raw()
    raw["aggregation"]["coordinates"]["morton"] = "int64"
    path = tmp_path / "int64.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(
        ConfigError, match=r"^config file '.*int64\.yaml': aggregation\.coordinates\.morton: must"
    ):
        load_config(path)


# --- hostile or broken files: one clear error naming the file, bounded time and memory ---


def _one_line_error(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"config file {str(path)!r}") and "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: " + "[" * 20_000 + "]" * 20_000, "line 1, column 35: nested deeper than 32 levels"),
        ("".join(f"{' ' * i}k{i}:\n" for i in range(200)), "nested deeper than 32 levels"),
        ("a: " + "{x: " * 20_000 + "1" + "}" * 20_000, "nested deeper than 32 levels"),
    ],
    ids=["flow-sequences", "block-mappings", "flow-mappings"],
)
def test_a_deeply_nested_file_is_refused_not_a_recursion_error(tmp_path, text, message):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    assert message in _one_line_error(path)


def test_aliases_are_refused_so_a_billion_laughs_cannot_expand(tmp_path):
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):  # 9**10 strings were it expanded
        previous = chr(ord("a") + i - 1)
        levels.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + f"*{previous}, " * 9 + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(levels) + "\n")
    assert "line 2, column 8: aliases (*name) are not allowed" in _one_line_error(path)


def test_a_merge_key_is_an_alias_too(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {reader: h5coro}\ndata_source:\n  <<: *b\n")
    assert "aliases (*name) are not allowed" in _one_line_error(path)


def test_a_huge_file_is_refused_after_reading_a_bounded_prefix(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:  # valid YAML, 2.5 MB
        for i in range(150_000):
            f.write(f"key{i}: value\n")
    assert "is larger than 1 MiB: not a config" in _one_line_error(path)


def test_a_device_that_never_ends_is_refused():
    assert "is larger than 1 MiB" in _one_line_error("/dev/zero")


def test_a_binary_file_is_refused_as_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"name: \xff\xfe\x00\n")
    assert "is not UTF-8 text (byte 6)" in _one_line_error(path)


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata_source: [1, 2\n")
    assert _one_line_error(path).endswith(
        "is not valid YAML: line 3, column 1: while parsing a flow sequence; "
        "expected ',' or ']', but got '<stream end>'"
    )


def test_an_unknown_key_in_a_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump({**_raw(), "extra": 1}, sort_keys=False))
    assert "extra: unknown key (allowed: name, data_source" in _one_line_error(path)


def test_a_python_tag_is_refused_by_the_safe_loader(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("name: !!python/object/apply:os.system [id]\n")
    assert "could not determine a constructor" in _one_line_error(path)


def test_height_change_section_adds_the_fit_columns_and_is_optional():
    config = load_config()
    assert config.height_change is not None and config.height_change.time == "delta_time"
    assert (config.height_change.height, config.height_change.sigma) == ("h_li", "h_li_sigma")
    assert config.point_columns == ("h_li", "h_li_sigma", "latitude", "longitude", "time")
    plain = load_config({k: v for k, v in _raw().items() if k != "height_change"})
    assert plain.height_change is None and plain.point_columns == ("h_li", "h_li_sigma")
    assert plain.hash != config.hash, "cycle stores made with and without it differ"
