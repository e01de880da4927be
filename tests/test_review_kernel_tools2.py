"""Tuned tile tables that are valid JSON but no table: bools in a config, a file nested past the
recursion limit, a key given twice, rows or ``entries`` of the wrong type, each refused in one line
naming the file; a table written before rows recorded dtype, Triton and card still applies. Real
files, the real loader; CPU. Expected runtime: ~2 s.
"""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from kernels import tile_configs
from kernels.tile_configs import TileConfig

ROW = {"arch": "sm_90", "kind": "ce_fwd", "shape_class": "large", "config": [64, 64, 32, 4, 2]}


def _refusal(path) -> str:
    with pytest.raises(ValueError, match="fix or delete it") as info:
        tile_configs.load_tuned(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.mark.parametrize("config", [[64, 64, 32, True, True], [64, 64, 32, 4, True], [64, 64, 32, True, 2]])
def test_a_config_of_json_booleans_is_refused_naming_the_entry(tmp_path, config):
    """JSON ``true`` is an int to Python: the row loaded as num_warps=True, num_stages=True."""
    path = tmp_path / "bools.json"
    path.write_text(json.dumps({"entries": [ROW, ROW | {"kind": "ce_grad", "config": config}]}))
    assert "entry 2 has config" in _refusal(path)
    with pytest.raises(ValueError, match="powers of two"):
        tile_configs.check_compilable(TileConfig(True, 64, 32, 4, 2))


@pytest.mark.parametrize("where", ["document", "row"])
def test_a_table_nested_past_the_recursion_limit_is_one_line(tmp_path, where):
    """json raised RecursionError, which the loader did not catch: a traceback at the first launch."""
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / f"deep_{where}.json"
    path.write_text(deep if where == "document" else '{"entries": [' + deep + "]}")
    assert "nested too deeply" in _refusal(path)


def test_a_key_given_twice_is_refused_instead_of_dropping_the_first(tmp_path):
    """A hand merge of two sweeps as two "entries" lists loaded only the last (here: no rows at
    all), and a row with two "config" keys silently took the last."""
    rows = json.dumps([ROW])
    two_lists = tmp_path / "two_lists.json"
    two_lists.write_text('{"entries": ' + rows + ', "entries": []}')
    assert "key 'entries' appears twice" in _refusal(two_lists)
    two_configs = tmp_path / "two_configs.json"
    row = json.dumps(ROW)[:-1] + ', "config": [128, 128, 64, 8, 3]}'
    two_configs.write_text('{"entries": [' + row + "]}")
    assert "key 'config' appears twice" in _refusal(two_configs)


@pytest.mark.parametrize(
    "doc, says",
    [
        ({"entries": {}}, "holding a list of rows"),
        ({"entries": ""}, "holding a list of rows"),
        ([ROW], "holding a list of rows"),
        (7, "holding a list of rows"),
        ({"entries": [ROW, None]}, "entry 2 is None, not an object"),
        ({"entries": [{"kind": "ce_fwd"}]}, "entry 1 lacks 'arch', 'shape_class', 'config'"),
        ({"entries": [ROW | {"config": [64, 64, 32, 4]}]}, "entry 1 has config [64, 64, 32, 4]"),
        ({"entries": [ROW | {"source": 5}]}, "entry 1 has source 5"),
        ({"entries": [ROW | {"shape_class": "huge"}]}, "entry 1 has shape_class 'huge'"),
    ],
    ids=[
        "entries-dict",
        "entries-str",
        "list",
        "number",
        "null-row",
        "short-row",
        "config4",
        "source",
        "cls",
    ],
)
def test_json_of_the_wrong_shape_is_refused_saying_what_is_wrong(tmp_path, doc, says):
    """An empty dict or string as "entries" loaded as an empty table (the tuning silently unused);
    the others were one line quoting a Python internal ("'int' object is not subscriptable")."""
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(doc))
    assert says in _refusal(path)


def test_a_table_without_dtype_triton_or_card_still_applies(tmp_path, monkeypatch):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"entries": [ROW | {"source": "hand-tuned"}]}))
    monkeypatch.setenv(tile_configs.TUNED_ENV, str(path))
    tile_configs.load_tuned.cache_clear()
    try:
        for dtype in (torch.bfloat16, torch.float32, None):
            entry = tile_configs.lookup("sm_90", "ce_fwd", 8192, 8192, dtype, "9.0")
            assert entry.config == TileConfig(64, 64, 32, 4, 2) and entry.source == "hand-tuned"
    finally:
        tile_configs.load_tuned.cache_clear()
