"""Pool the trials of several sweep runs into one results and summary table (e.g. seeds run as separate sweeps).

Reads each run's ``results.csv`` (``anyorder_ray.results.tables.read_rows``) and writes ``results.{csv,md}`` and
``summary.{csv,md}`` into OUT as one sweep would, with each run's ``experiment.yaml`` copied as
``experiment-<run name>.yaml``. It pools whatever it is given: the summary's ``budget`` column lists every budget an
arm had, and the copied configs say what each run was.

Run: python docs/results/pool_runs.py OUT RUN [RUN ...]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from anyorder_ray.results.tables import read_rows, sort_rows, write_summary, write_tables


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out, runs = Path(argv[0]), [Path(r) for r in argv[1:]]
    missing = [str(r) for r in runs if not (r / "results.csv").is_file()]
    if missing:
        print(f"no results.csv in: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = sort_rows([row for run in runs for row in read_rows(run / "results.csv")])
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if (run / "experiment.yaml").is_file():
            shutil.copyfile(run / "experiment.yaml", out / f"experiment-{run.name}.yaml")
    print(write_tables(rows, out))
    print()
    print(write_summary(rows, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
