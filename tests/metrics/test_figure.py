"""The typed figure record and its JSON."""
from __future__ import annotations

import json

from meddiff.metrics.figure import Figure, json_or_none


def test_to_json_lays_out_value_interval_reference_counts_details_and_protocol():
    fig = Figure(0.5, (0.4, 0.6), 0.55, {"n_fake": 3, "n_real": 4}, "recipe-1", {"k": 5})
    assert json.loads(json.dumps(fig.to_json())) == {"value": 0.5, "ci95": [0.4, 0.6], "reference": 0.55,
                                                     "n_fake": 3, "n_real": 4, "k": 5, "protocol": "recipe-1"}
    assert (fig.n_fake, fig.n_real) == (3, 4)


def test_a_figure_without_interval_or_protocol_says_so():
    out = Figure(1.0).to_json()
    assert out == {"value": 1.0, "ci95": None, "reference": None} and "protocol" not in out
    assert json_or_none(None) is None and json_or_none(Figure(2.0))["value"] == 2.0
