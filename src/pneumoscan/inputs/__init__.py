"""Reading inputs: the one loader of X-rays (JPEG, PNG, DICOM) and the one preprocessing.

Everything below it (``running``, ``learning``, ``apps``) reads images through here,
so a file is either scored the same way everywhere or refused with the same typed error.
"""
