"""Running the exported model: ONNX Runtime, calibration, the gate, populations, heat maps, drift.

No PyTorch: serving, triage and the DICOM node import only this and ``inputs``.
"""
