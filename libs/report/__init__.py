"""HTML pages a person opens to see what the tool decided, each one self-contained in its folder.

    html.py           the shared page pieces: escaping, relative links, tables, number cells, the atomic write
    trained.py        what a subject's training predicted, for outputs/score_report.html

Pages link only to files inside their own folder tree (relative, URL-quoted) and load no script, font or
style from elsewhere, so a copied, moved or unzipped folder opens from file:// as it did in place.
libs/score/report.py (outputs/score_report.html), libs/train/run_report.py (<out>/report.html of a training
run) and libs/train/search_report.py (<out>/auto_recipe/report.html of a search) use these pieces; this package
imports nothing from libs/train, so training and scoring can both use it.
"""
