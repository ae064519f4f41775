"""Calibration data collection from real media for INT8 builds."""
