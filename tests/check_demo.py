"""Checks a finished `make demo` (CI runs it after `make demo ARGS=--quick`):

    python -m tests.check_demo [demo-work]

* the report exists, stands alone, and holds the metric table (vqa, caption, grounding) and one sample image
  per task with its prediction;
* no process of the demo's services is left: none in the sessions it recorded and none whose arguments name
  its work directory or its Ray temp dir.
Exit status 1 with what is wrong.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipelines.local.services import processes


def check(workdir: Path) -> list[str]:
    problems = []
    report = workdir / "report.html"
    if not report.is_file():
        return [f"no report at {report}"]
    html = report.read_text()
    table = html[html.find("<table id='metrics'>"):]
    table = table[: table.find("</table>")]
    for task in ("vqa", "caption", "grounding"):
        if f"<td>{task}</td>" not in table:
            problems.append(f"the metric table has no row for {task}")
        rows = re.findall(rf"<tr class='sample-row' data-task='{task}' data-judged='\w*'>(.*?)</tr>", html, re.S)
        if not rows:
            problems.append(f"no sample for {task}")
        elif not all(row.count("data:image/png;base64,") == 1 for row in rows):
            problems.append(f"a {task} sample has no inlined image")
    if re.search(r"src=\"https?:", html):
        problems.append("the report links an external resource")
    markers = [str(workdir.resolve())]
    ray_tmp = workdir / "ray-temp-dir"
    if ray_tmp.is_file():
        markers.append(ray_tmp.read_text().strip())
    left = processes(set(), tuple(markers))
    if left:
        problems.append(f"processes left behind: {left}")
    if (workdir / "services.json").exists():
        problems.append("services.json is still there: the services were not stopped")
    return problems


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-work")
    problems = check(workdir)
    for p in problems:
        print(f"check_demo: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check_demo: {workdir}: report complete, no processes left")


if __name__ == "__main__":
    main()
