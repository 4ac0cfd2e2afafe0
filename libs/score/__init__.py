"""Scoring, shaped like libs/train: the competition metric over a run (scorer.py), its result types and
means (results.py), the JSON/CSV/HTML reports (report.py)."""
