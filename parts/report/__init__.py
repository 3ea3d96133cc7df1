"""`parts report`: a sweep as a static site (overview, one page per task, a view of every component).

`parts.report.data` turns saved runs into plain JSON-ready data, `parts.report.site` writes the
pages (plotly.js copied once into the folder; nothing loaded from the network), and
`parts.report.attention` adds head attention for `--attention` (the only part that needs the model).
"""
