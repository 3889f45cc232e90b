"""Evaluation harnesses that score existing benchmark outputs and annotations (AlpacaEval, ...)."""
