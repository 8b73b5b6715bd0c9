"""Evaluating mixes: refusal and DPO metrics, sweeps over the weights, and the constrained search of ``tune``."""
