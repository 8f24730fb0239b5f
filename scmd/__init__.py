"""Helpers of scmd_ref.py that are not the algorithm: data layout, hparams, outputs, the embedded world."""
