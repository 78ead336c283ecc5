"""The compression pipeline: ``pipeline.compress`` calls the steps, one module each, in order.

targets → calibration → stages → statistics (through a driver) → factorize + score (into the
factor store, cached) → allocate → truncate → correct → report; saving is ``zsfw.checkpoint``.
"""
