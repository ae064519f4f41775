"""vsal: deployment toolkit for video-SALMONN.

vsal.export   torch side: model parts, checkpoints, ONNX export, engine building
vsal.runtime  torch-free: media, preprocessing, backends, pipeline, generation
vsal.calib    calibration data from real media, INT8
"""

__version__ = "0.1.0"
