"""Results table formatting (pure, no Ray)."""

from __future__ import annotations

import csv
import math

from anyorder_ray.results import COLUMNS, make_row, markdown_table, write_tables


def test_rows_name_the_arm_and_carry_the_final_metrics(tmp_path):
    metrics = {"eval/success_rate": 0.9, "eval/success_low": 0.85, "eval/success_high": 0.94, "eval/episodes": 200,
               "eval/world_model_nll": 0.5, "eval/action_nll": 0.2, "train/step": 600, "train/total_tokens": 1e6,
               "time_total_s": 250.0, "checkpoint_path": "/x/ckpt"}  # fmt: skip
    rows = [
        make_row("t1", {"arm": {"mode": "any_order", "mask_prob": 0.3}, "seed": 0}, metrics, "ok"),
        make_row("t2", {"arm": {"mode": "causal"}, "seed": 1}, {}, "error"),
    ]
    assert rows[0]["arm"] == "any_order@0.3" and rows[0]["mask_prob"] == 0.3
    assert rows[1]["arm"] == "causal" and math.isnan(rows[1]["mask_prob"]) and math.isnan(rows[1]["success"])
    md = write_tables(rows, tmp_path)
    assert md == markdown_table(rows)
    lines = md.splitlines()
    assert len(lines) == 4
    assert "| any_order@0.3 | 0 | 0.900 [0.850, 0.940] | 200.000 | 0.500 | 0.200 | 600.000 |" in lines[2]
    assert lines[3].startswith("| causal | 1 | – [–, –]") and lines[3].endswith("error |")
    with (tmp_path / "results.csv").open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(COLUMNS)
    assert float(read[0]["success"]) == 0.9 and read[0]["checkpoint"] == "/x/ckpt"
    assert (tmp_path / "results.md").read_text().strip() == md


def test_sampled_mask_prob_overrides_the_arm_default():
    row = make_row("t", {"arm": {"mode": "obs_only"}, "mask_prob": 0.42, "seed": 2}, {}, "ok")
    assert row["arm"] == "obs_only@0.42"
