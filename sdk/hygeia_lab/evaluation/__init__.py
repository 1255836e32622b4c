"""Evaluation of Hygeia models: MOSES metrics for molecules, held-out metrics for diagnosers."""
