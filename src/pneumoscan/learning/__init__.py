"""Learning: datasets on disk, training, evaluation, export, quantisation and a site's calibration.

Modules that train or export import PyTorch themselves; importing this package does not.
"""
