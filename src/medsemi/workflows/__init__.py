"""What a command does: export, runs (and, after the layout move, evaluate/compare/predict)."""
