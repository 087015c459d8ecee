"""What a command does: evaluate a run + report, compare/demo, predict (2D/3D), export, runs."""
