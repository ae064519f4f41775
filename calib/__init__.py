"""Calibration data from real media: each graph's inputs as the runtime feeds them, recorded on clips
and stored in the package (vsal.calib.collect) for the calibrated quantizers (vsal.transforms.quantizers)."""
