"""Screenshots of a report made by `parts report`, for the README (figures/report-*.png).

    python scripts/report_screenshots.py REPORT_DIR figures/ --task sst2 --component L16H4 --run 2

Opens the overview, a task page and a component view in Debian's headless Chromium (Playwright pointed at
/usr/bin/chromium; nothing is downloaded) and fails if a page logs an error or requests anything outside
the report's folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--task", required=True, help="the task page to show (its key, e.g. sst2)")
    parser.add_argument("--component", required=True, help="the component to open, e.g. L16H4")
    parser.add_argument("--run", type=int, default=0, help="the run selected for the task page and component view")
    args = parser.parse_args()
    folder = args.report.resolve()
    task = f"task-{args.task}.html"
    shots = [
        ("index.html", "report-overview.png", None),
        (f"{task}#run={args.run}", "report-task.png", None),
        (f"{task}#run={args.run}&component={args.component}", "report-component.png", "#component"),
    ]
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda r: None if r.url.startswith(folder.as_uri()) else problems.append(f"request {r.url}"))
        for name, png, element in shots:
            page_name, _, fragment = name.partition("#")
            page.goto((folder / page_name).as_uri() + (f"#{fragment}" if fragment else ""))
            page.wait_for_function("document.querySelectorAll('.main-svg').length > 0")
            if element:
                page.wait_for_selector(f"{element}[data-ready]")
                page.wait_for_timeout(500)
                page.locator(element).screenshot(path=args.out / png)
            else:
                # the task page tall enough to show the top and bottom tables under the heatmap
                page.set_viewport_size({"width": 1280, "height": 1450 if page_name.startswith("task-") else 900})
                page.wait_for_timeout(500)
                page.evaluate("window.scrollTo(0, 0)")
                page.screenshot(path=args.out / png)
            print(args.out / png)
        browser.close()
    if problems:
        raise SystemExit("the report misbehaved: " + "; ".join(problems))


if __name__ == "__main__":
    main()
