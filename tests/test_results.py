"""Results table formatting (pure, no Ray)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_GUARD_S, results_script

from anyorder_ray.config import EvalConfig, ExperimentConfig, config_from_dict
from anyorder_ray.fileio import atomic_directory, atomic_write
from anyorder_ray.results.plots import write_plots
from anyorder_ray.results.tables import (
    COLUMNS,
    arm_summary,
    make_row,
    markdown_table,
    read_rows,
    results_rows,
    write_summary,
    write_tables,
)


def _trial(arm: dict, seed: int = 0, **params) -> ExperimentConfig:
    """The resolved config of the trial of ``arm`` (a partial masking section) with ``seed`` and sampled ``params``."""
    cfg = config_from_dict({"sweep": {"arms": [arm]}})
    return cfg.trial({"arm": cfg.arms()[0].label(), "seed": seed, **params})


@dataclasses.dataclass
class _TrialResult:
    """The four fields of a Tune ``Result`` that ``results_rows`` reads (this module stays free of Ray)."""

    metrics: dict
    config: dict | None
    error: Exception | None = None
    path: str = "/runs/x/tune/trial"


def test_a_trial_whose_final_evaluation_failed_is_an_error_row():
    cfg = config_from_dict({"sweep": {"arms": [{"mode": "causal"}], "seeds": [0, 1, 2, 3]}})
    base = {"train/step": 10, "eval/success_rate": 0.5, "eval/episodes": 8}
    results = [
        _TrialResult({**base, "trial_id": "a", "eval/final": 1}, {"arm": "causal", "seed": 0}),
        _TrialResult({**base, "trial_id": "b", "eval/final": 1, "eval/failed": 1.0}, {"arm": "causal", "seed": 1}),
        _TrialResult({**base, "trial_id": "c"}, {"arm": "causal", "seed": 2}),  # stopped before its final report
        _TrialResult({**base, "trial_id": "d"}, {"arm": "causal", "seed": 3}, error=RuntimeError("worker died")),
        _TrialResult({"trial_id": "e"}, None, path="/runs/x/tune/e"),  # pending when the sweep stopped
        # Failed before its first report: Tune's Result has no config, ExperimentAnalysis.trials has it.
        _TrialResult({}, None, error=RuntimeError("no such checkpoint"), path="/runs/x/tune/f"),
    ]
    configs = {"/runs/x/tune/e": {"arm": "causal", "seed": 4}, "/runs/x/tune/f": {"arm": "causal", "seed": 5}}
    rows = results_rows(results, cfg, configs)
    status = {r["trial"]: r["status"] for r in rows}
    assert status == {"a": "ok", "b": "error", "c": "partial", "d": "error", "f": "error"}
    assert {r["trial"]: r["seed"] for r in rows}["f"] == 5  # its own seed, not the defaults' 0
    # Without the configs "f" has no row at all rather than one with the defaults' arm and seed; nor has "e".
    assert {r["trial"] for r in results_rows(results, cfg)} == {"a", "b", "c", "d"}


def test_rows_name_the_arm_and_carry_the_final_metrics(tmp_path):
    metrics = {"eval/success_rate": 0.9, "eval/success_low": 0.85, "eval/success_high": 0.94, "eval/episodes": 200,
               "eval/world_model_nll": 0.5, "eval/action_nll": 0.2, "train/step": 600, "train/total_tokens": 1e6,
               "time_total_s": 250.0, "checkpoint_path": "/x/ckpt"}  # fmt: skip
    rows = [
        make_row("t1", _trial({"mode": "any_order", "mask_prob": 0.3}, 0), metrics, "ok"),
        make_row("t2", _trial({"mode": "causal"}, 1), {}, "error"),
    ]
    assert rows[0]["arm"] == "any_order@0.3" and rows[0]["mask_prob"] == 0.3
    assert rows[1]["arm"] == "causal" and math.isnan(rows[1]["mask_prob"]) and math.isnan(rows[1]["success"])
    md = write_tables(rows, tmp_path)
    assert md == markdown_table(rows)
    lines = md.splitlines()
    assert len(lines) == 4
    assert (
        "| any_order@0.3 | 0 | 0.900 [0.850, 0.940] | 200 | 0.500 | 0.200 | 600 | 600 steps | – | 1000000 |" in lines[2]
    )
    assert lines[3].startswith("| causal | 1 | – [–, –]") and lines[3].endswith("error |")
    with (tmp_path / "results.csv").open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(COLUMNS)
    assert float(read[0]["success"]) == 0.9 and read[0]["checkpoint"] == "/x/ckpt"
    assert (read[0]["episodes"], read[0]["train_steps"], read[0]["train_tokens"]) == ("200", "600", "1000000")
    assert (tmp_path / "results.md").read_text().strip() == md


def test_sampled_mask_prob_overrides_the_arm_default():
    row = make_row("t", _trial({"mode": "obs_only"}, 2, mask_prob=0.42), {}, "ok")
    assert row["arm"] == "obs_only@0.42" and row["mask_prob"] == 0.42 and row["seed"] == 2


class _Unprintable:
    """A value whose formatting fails, as a corrupted metric could: raised while the table is written."""

    def __str__(self) -> str:
        raise RuntimeError("cannot format this value")


def _row(trial: str, success: float) -> dict:
    return make_row(trial, _trial({"mode": "causal"}), {"eval/success_rate": success}, "ok")


def test_a_failure_mid_write_keeps_the_previous_tables(tmp_path):
    write_tables([_row("t1", 0.5), _row("t2", 0.7)], tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"results.csv", "results.md"}
    bad = [_row("t1", 0.6), {**_row("t2", 0.8), "checkpoint": _Unprintable()}]
    with pytest.raises(RuntimeError, match="cannot format"):
        write_tables(bad, tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}  # no temp files left either
    assert after == before


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("new, but only ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    atomic_write(path, lambda tmp: tmp.write_text("new\n"))
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # permissions follow the umask like any other file (a temp file's 0600 would not)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_process_killed_mid_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("| old table |\n")
    # A real crash: the writer process dies (SIGKILL, no cleanup runs) after writing half of the new file.
    code = f"""
import os, signal
from pathlib import Path
from anyorder_ray.fileio import atomic_write

def half_then_die(tmp):
    with tmp.open("w") as f:
        f.write("| new ta")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(Path({str(path)!r}), half_then_die)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_text() == "| old table |\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".results.") and leftovers[0].endswith(".tmp.md")


def test_plots_are_written_as_complete_pngs(tmp_path):
    rows = [_row("t1", 0.5), make_row("t2", _trial({"mode": "any_order", "mask_prob": 0.3}), {}, "error")]
    paths = write_plots([], _trial({"mode": "causal"}), rows, tmp_path)
    assert [p.name for p in paths] == ["success_vs_step.png", "final_per_arm.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left
    for p in paths:
        assert p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and p.stat().st_size > 1000
    # With final evaluations (episodes and NLLs) the success / world-model trade-off plot is drawn too.
    finals = [make_row("a", _trial({"mode": "causal"}, 0), _final(0.9), "ok"),
              make_row("b", _trial({"mode": "prefix"}, 0), _final(0.0), "ok")]  # fmt: skip
    (tmp_path / "more").mkdir()
    more = write_plots([], _trial({"mode": "causal"}), finals, tmp_path / "more")
    assert [p.name for p in more] == ["success_vs_step.png", "final_per_arm.png", "success_vs_world_model.png"]
    assert more[-1].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def _final(success: float, episodes: int = 200, **extra: float) -> dict:
    fixed = {"eval/world_model_nll_per_obs": 10.0, "eval/world_model_nll": 0.5, "eval/action_nll": 0.2}
    return {"eval/success_rate": success, "eval/episodes": episodes, "train/step": 100, "time_total_s": 60.0,
            **fixed, **extra}  # fmt: skip


def test_arm_summary_pools_seeds_and_compares_with_the_reference(tmp_path):
    causal, focus = {"mode": "causal"}, {"mode": "action_focus", "mask_prob": 0.3, "loss_norm": "unit"}
    rows = [
        make_row("a", _trial(causal, 0), _final(0.90), "ok"),
        make_row("b", _trial(causal, 1), _final(0.80), "ok"),
        make_row("c", _trial(focus, 0), _final(0.85), "ok"),
        make_row("d", _trial(focus, 1), _final(0.75), "ok"),
        make_row("e", _trial({"mode": "prefix"}, 0), _final(0.0), "ok"),
        make_row("f", _trial({"mode": "prefix"}, 1), {}, "error"),  # no final evaluation: left out
    ]
    by_arm = {r["arm"]: r for r in arm_summary(rows)}
    c, f, p = by_arm["causal"], by_arm["action_focus@0.3+unit"], by_arm["prefix"]
    assert (c["seeds"], c["episodes"], c["success"]) == (2, 400, pytest.approx(0.85))
    assert c["success_low"] < 0.85 < c["success_high"] and c["seed_success_min"] == 0.8
    assert math.isnan(c["vs_reference"])
    assert f["vs_reference"] == pytest.approx(-0.05)
    assert 0.05 < f["p_value"] < 0.2  # 0.80 vs 0.85, 400 episodes each: z = 1.86, p = 0.063
    assert p["seeds"] == 1 and p["p_value"] < 1e-10
    md = write_summary(rows, tmp_path)
    assert (tmp_path / "summary.md").read_text().strip() == md
    assert "| causal | 2 | 0.850 [" in md and "-0.050 (0.0" in md
    assert "| 100 | 600 steps | – | 60.000 |" in md  # mean steps of the seeds as a count, the arm's budget
    with (tmp_path / "summary.csv").open() as f_csv:
        assert len(list(csv.DictReader(f_csv))) == 3


def test_an_atomic_directory_appears_whole_with_normal_permissions(tmp_path):
    target = tmp_path / "checkpoint"
    with pytest.raises(RuntimeError, match="disk"), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk gone")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("whole")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert (target / "weights").read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint",
        "plain",
    ]
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not tempfile's 0700
    with atomic_directory(target) as tmp:  # an existing folder is replaced whole
        (tmp / "other").write_text("x")
    assert [p.name for p in target.iterdir()] == ["other"]


def test_rows_say_which_budget_each_arm_had_and_what_it_used():
    cfg = config_from_dict({"train": {"flop_budget": 2.0e14}, "sweep": {"arms": [{"mode": "causal"}]}})
    row = make_row("t", cfg.trial({"arm": "causal"}), {"train/total_flops": 2.013e14, "train/step": 1234}, "ok")
    assert (row["budget"], row["train_flops"], row["train_steps"]) == ("2e+14 FLOPs", 2.013e14, 1234)
    assert "| 1234 | 2e+14 FLOPs | 2.01e+14 |" in markdown_table([row])


def test_total_compute_is_a_column_where_a_trial_reported_it(tmp_path):
    """``compute/total_flops`` (training + the rollout actors' policy forwards) goes into ``total_flops``; the Markdown
    tables show the column only when some row has it (older runs did not report it), the CSV always has it."""
    arm = {"mode": "causal"}
    with_total = make_row("a", _trial(arm, 0), _final(0.9, **{"train/total_flops": 2.0e14,
                          "compute/total_flops": 2.6e14}), "ok")  # fmt: skip
    without = make_row("b", _trial(arm, 1), _final(0.8, **{"train/total_flops": 2.0e14}), "ok")
    assert with_total["total_flops"] == 2.6e14 and math.isnan(without["total_flops"])
    md = markdown_table([with_total, without])
    assert "| FLOPs used | total FLOPs | train tokens |" in md
    assert "| 2e+14 | 2.6e+14 |" in md and "| 2e+14 | – |" in md
    assert "total FLOPs" not in markdown_table([without])
    summary = write_summary([with_total, without], tmp_path)
    assert "| FLOPs used | total FLOPs | wall s |" in summary
    assert "| 2e+14 | 2.6e+14 |" in summary  # the mean of the seeds that have it
    write_tables([with_total, without], tmp_path)
    with (tmp_path / "results.csv").open() as f:
        read = list(csv.DictReader(f))
    assert [r["total_flops"] for r in read] == ["260000000000000.0", "nan"]


def test_world_model_columns_of_issue_13_render_where_present_and_old_rows_read_as_before(tmp_path):
    """Exact match and the off-expert / on-policy sets land in the CSVs and, where some row has them, in the Markdown
    tables; rows of runs made before them (no such metrics) keep their tables unchanged."""
    new = {"eval/world_model_exact": 0.25, "eval/offexpert_world_model_nll": 1.5,
           "eval/offexpert_world_model_nll_per_obs": 30.0, "eval/offexpert_world_model_exact": 0.125,
           "eval/onpolicy_world_model_nll": 0.75, "eval/onpolicy_world_model_nll_per_obs": 15.0,
           "eval/onpolicy_world_model_exact": 0.5}  # fmt: skip
    old_rows = [make_row("a", _trial({"mode": "causal"}, 0), _final(0.9), "ok")]
    old_md = markdown_table(old_rows)
    assert "exact" not in old_md and "off-expert" not in old_md and "on-policy" not in old_md
    assert "exact" not in write_summary(old_rows, tmp_path)

    other_seed = {**new, "eval/world_model_exact": 0.75}
    rows = [*old_rows, make_row("b", _trial({"mode": "prefix"}, 0), _final(0.1, **new), "ok"),
            make_row("c", _trial({"mode": "prefix"}, 1), _final(0.3, **other_seed), "ok")]  # fmt: skip
    md = write_tables(rows, tmp_path)
    header = md.splitlines()[0]
    assert ("| world-model NLL | WM exact | off-expert WM NLL | off-expert WM exact | on-policy WM NLL | "
            "on-policy WM exact | action NLL |") in header  # fmt: skip
    assert "| 0.500 | – | – | – | – | – | 0.200 |" in md.splitlines()[2]  # the old row: its metrics are absent
    assert "| 0.500 | 0.250 | 1.500 | 0.125 | 0.750 | 0.500 | 0.200 |" in md
    with (tmp_path / "results.csv").open() as f:
        read = {r["trial"]: r for r in csv.DictReader(f)}
    assert float(read["b"]["offexpert_world_model_nll_per_obs"]) == 30.0 and read["a"]["world_model_exact"] == "nan"

    summary = write_summary(rows, tmp_path)
    assert ("| world-model NLL / obs | WM exact | off-expert WM NLL / obs | off-expert WM exact | "
            "on-policy WM NLL / obs | on-policy WM exact | action NLL |") in summary  # fmt: skip
    assert "| 10.000 | 0.500 | 30.000 | 0.125 | 15.000 | 0.500 | 0.200 |" in summary  # prefix: mean of 2 seeds
    with (tmp_path / "summary.csv").open() as f:
        prefix = next(r for r in csv.DictReader(f) if r["arm"] == "prefix")
    assert float(prefix["world_model_exact"]) == 0.5 and float(prefix["onpolicy_world_model_exact"]) == 0.5


def test_rows_read_back_from_results_csv_pool_runs_as_one(tmp_path):
    """``read_rows`` gives back what ``write_tables`` wrote, so trials of runs made apart (seeds split over two runs)
    summarise as one run would; a CSV written before a column existed reads it as NaN."""
    extra = {"eval/world_model_exact": 0.25, "compute/total_flops": 3.0e12}
    rows = [make_row(f"t{s}", _trial({"mode": mode}, s), _final(0.1 * (s + 1) + (mode == "prefix") * 0.05, **extra),
                     "ok") for mode in ("causal", "prefix") for s in range(3)]  # fmt: skip
    rows.append(make_row("failed", _trial({"mode": "causal"}, 3), {}, "error"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_tables(rows[:2], tmp_path / "a")
    write_tables(rows[2:], tmp_path / "b")
    back = read_rows(tmp_path / "a" / "results.csv") + read_rows(tmp_path / "b" / "results.csv")
    assert len(back) == len(rows)
    for r, b in zip(rows, back, strict=True):
        assert r.keys() == b.keys()
        for key, value in r.items():
            same = value == b[key] or (isinstance(value, float) and math.isnan(value) and math.isnan(b[key]))
            assert same, (key, value, b[key])
    assert write_summary(back, tmp_path / "a") == write_summary(rows, tmp_path / "b")
    old = tmp_path / "old.csv"
    with (tmp_path / "a" / "results.csv").open() as f:
        lines = list(csv.DictReader(f))
    with old.open("w", newline="") as f:
        keep = [k for k in lines[0] if k != "total_flops"]
        writer = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(lines)
    assert all(math.isnan(r["total_flops"]) and r["world_model_exact"] == 0.25 for r in read_rows(old))


def test_the_environment_record_names_this_checkout_the_libraries_and_the_cpu():
    import importlib.metadata
    import json

    import torch

    from anyorder_ray.results.provenance import environment_record

    record = environment_record("resume")
    assert record["event"] == "resume"
    assert record["packages"]["torch"] == importlib.metadata.version("torch")
    assert record["packages"]["ray"] == importlib.metadata.version("ray")
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["cpu"] and record["cpu_count"] == os.cpu_count()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI clones one); an unpacked source tree has no commit to name
        assert record["commit"] == head.stdout.strip() and isinstance(record["uncommitted_changes"], bool)
    else:
        assert record["commit"] is None and record["uncommitted_changes"] is None
    assert json.loads(json.dumps(record)) == record  # one JSON line per start


def _episodes_csv(folder: Path, rows: list[tuple[str, str, int, int]]) -> Path:
    """An evaluation folder whose episodes.csv (the columns ``python -m anyorder_ray.evaluate`` writes) holds ``rows``
    of (trial, arm, episode seed, success)."""
    from anyorder_ray.evaluate import EPISODE_COLUMNS

    folder.mkdir(parents=True)
    with (folder / "episodes.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EPISODE_COLUMNS)
        writer.writeheader()
        for trial, arm, seed, success in rows:
            writer.writerow({"trial": trial, "arm": arm, "seed": 0, "episode_seed": seed, "success": success,
                             "length": 3, "reward": 0.9 * success, "actions": "left | forward"})  # fmt: skip
    return folder


def test_two_evaluations_are_compared_episode_by_episode(tmp_path, capsys):
    from anyorder_ray.results.compare import compare, main, mcnemar_p, read_episodes

    # McNemar's exact test: the doubled binomial tail of the discordant pairs at 1/2.
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(1, 18) == pytest.approx(2 * (1 + 19) / 2**19)
    assert mcnemar_p(0, 27) == mcnemar_p(27, 0) == pytest.approx(2 / 2**27)
    # Arm x: A solves 6 of 10, B 9 (B alone on 4 episodes, A alone on 1); arm y: identical sides, 2 of 4.
    a_x, b_x = [1, 1, 1, 1, 1, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    a = _episodes_csv(tmp_path / "a", [("t0", "x", s, k) for s, k in enumerate(a_x)]
                      + [("t1", "y", s, s % 2) for s in range(4)])  # fmt: skip
    b_rows = [("t0", "x", s, k) for s, k in enumerate(b_x)]
    b_first, b_second = (
        _episodes_csv(tmp_path / "b1", b_rows),
        _episodes_csv(tmp_path / "b2", [("t1", "y", s, s % 2) for s in range(4)]),
    )  # a side may span several evaluation folders
    rows = compare(read_episodes([a]), read_episodes([b_first, b_second]))
    assert [r["arm"] for r in rows] == ["x", "y"]
    x, y = rows
    assert (x["episodes"], x["success_a"], x["success_b"], x["only_a"], x["only_b"]) == (10, 0.6, 0.9, 1, 4)
    assert x["diff"] == pytest.approx(0.3) and x["p"] == pytest.approx(mcnemar_p(1, 4))
    assert (y["diff"], y["only_a"], y["only_b"], y["p"]) == (0.0, 0, 0, 1.0)
    assert main(["--a", str(a), "--b", str(b_first), str(b_second)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "RESULT arm=x episodes=10 success_a=0.600 success_b=0.900 b_minus_a=+0.300 only_a=1 only_b=4 " \
                     f"mcnemar_p={mcnemar_p(1, 4):.2g}"  # fmt: skip
    # Sides that played different episodes are refused, never compared on their overlap.
    assert main(["--a", str(a), "--b", str(b_first)]) == 2
    assert "different (trial, episode seed) pairs" in capsys.readouterr().err
    assert main(["--a", str(tmp_path), "--b", str(b_first)]) == 2
    assert "no episodes.csv" in capsys.readouterr().err


def test_the_tables_say_how_the_episodes_picked_their_actions(tmp_path):
    """``decoding`` comes from the evaluation's ``eval/temperature`` (the trial's config when it has none); the
    Markdown shows it only when some row was not greedy; CSVs from before the column read as greedy; an arm whose
    seeds were played both ways says so in the summary."""
    causal, focus = {"mode": "causal"}, {"mode": "cut_focus", "layout": "block", "loss_norm": "unit"}
    greedy = [make_row("a", _trial(causal, 0), _final(0.9), "ok"), make_row("b", _trial(focus, 0), _final(0.8), "ok")]
    assert [r["decoding"] for r in greedy] == ["greedy", "greedy"]
    assert "decoding" not in write_tables(greedy, tmp_path) and "decoding" not in write_summary(greedy, tmp_path)
    sampled_cfg = dataclasses.replace(_trial(causal, 1), eval=EvalConfig(temperature=0.5))
    from_cfg = make_row("c", sampled_cfg, _final(0.95), "ok")
    reported = make_row("d", _trial(causal, 2), _final(0.97, **{"eval/temperature": 1.0}), "ok")
    assert (from_cfg["decoding"], reported["decoding"]) == ("sampled T=0.5", "sampled T=1")
    rows = [*greedy, from_cfg, reported]
    md = write_tables(rows, tmp_path)
    assert "| episodes | decoding | world-model NLL |" in md and "| 200 | sampled T=1 |" in md
    assert [r["decoding"] for r in read_rows(tmp_path / "results.csv")] == [r["decoding"] for r in rows]
    summary = {r["arm"]: r for r in arm_summary(rows)}
    assert summary["causal"]["decoding"] == "greedy / sampled T=0.5 / sampled T=1"
    assert "| greedy / sampled T=0.5 / sampled T=1 |" in write_summary(rows, tmp_path)
    with (tmp_path / "results.csv").open() as f:
        lines = list(csv.DictReader(f))
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in lines[0] if k != "decoding"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(lines)
    assert {r["decoding"] for r in read_rows(old)} == {"greedy"}


def test_curves_prints_each_evaluation_of_each_trial_once_in_seed_order(tmp_path, capsys):
    """docs/results/dagger_gotolocal/scarce_demos/curves.py: reports repeat an evaluation's metrics until the next one;
    the script prints each evaluation once, the final one (more episodes at the same step) too."""
    curves = results_script("dagger_gotolocal", "scarce_demos", "curves.py")
    run = tmp_path / "run"
    reports = {"t1": [(500, 0.75, 32, 0.7), (500, 0.75, 32, 0.7), (1000, 0.5, 32, 1.1), (1000, 0.61, 200, 1.1)],
               "t0": [(500, 0.25, 32, 2.0)]}  # fmt: skip
    for trial, evals in reports.items():
        (run / "train" / f"train-{trial}").mkdir(parents=True)
        lines = [json.dumps({"train/step": 1})]  # a report before the first evaluation
        lines += [json.dumps({"eval/step": s, "eval/success_rate": p, "eval/episodes": n, "eval/action_nll": nll})
                  for s, p, n, nll in evals]  # fmt: skip
        (run / "train" / f"train-{trial}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "results.csv").write_text("trial,arm,seed\nt1,causal,1\nt0,causal,0\n")
    assert curves.main([str(run)]) == 0
    rows = [line.split(" | ")[2:] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [["0", "500", "0.250", "32", "2.000 |"], ["1", "500", "0.750", "32", "0.700 |"],
                    ["1", "1000", "0.500", "32", "1.100 |"], ["1", "1000", "0.610", "200", "1.100 |"]]  # fmt: skip
    (run / "train" / "train-t0" / "metrics.jsonl").unlink()
    assert curves.main([str(run)]) == 2  # a trial's reports missing: said, not skipped


def test_the_dagger_overview_is_the_committed_tables_and_refuses_unlike_pairs(capsys, monkeypatch):
    """docs/results/dagger_overview.py prints docs/results/DAGGER.md's tables from the committed result folders (so
    the page is regenerated, not retyped); a pair whose configs differ in more than the regime is refused."""
    overview = results_script("dagger_overview.py")
    assert overview.main() == 0
    printed = capsys.readouterr().out
    page = (Path(overview.__file__).parent / "DAGGER.md").read_text()
    assert page.endswith(printed), "DAGGER.md's tables are not what dagger_overview.py prints: regenerate them"
    unlike = ("dagger_gotolocal/scarce_demos/imitation", "dagger_gotolocal/block_12e12/dagger", ("causal",))
    monkeypatch.setattr(overview, "SAME_DEMOS", [unlike])
    with pytest.raises(SystemExit, match="configs differ in .*data.num_demos"):
        overview.main()
