"""Evaluation: run a model over task suites in auto and forced modes, score it, write a report and plots.

    evaluate(model_dir, ["arith"], out_dir="eval/")   -> report dict (also eval/report.json, report.md, PNGs)
    compare(a, b, out_dir="cmp/")                     -> the two side by side (compare.md, .json, .png)

Modules, one idea each: `metrics` (pure scoring of verified responses), `evaluate` (generation and
verification), `report` (report.json schema and Markdown), `plots` (matplotlib figures)."""
