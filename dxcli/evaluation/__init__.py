"""Evaluation: scoring answer files (`score`), and the rich summary tables (`report`).

`dxcli.evaluation.score` holds the metrics (scikit-learn; imported only when a command needs it);
`dxcli.evaluation.report` renders them with rich and imports nothing heavy, so `eval infer` can
print the same summary as `eval score`.
"""
