"""The applications: the ``pneumoscan`` command, prediction, triage, the web service and the DICOM node."""
