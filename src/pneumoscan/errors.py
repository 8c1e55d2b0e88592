"""Errors a user can meet, each with a message that says what to do.

The CLI turns every :class:`PneumoscanError` into a one-line message and exit
code 2 instead of a traceback; the coming web service maps them to HTTP statuses.
"""


class PneumoscanError(Exception):
    """Base class of every error that pneumoscan reports to a user."""

    exit_code = 2


class DatasetNotFoundError(PneumoscanError):
    """The data root does not have the expected ``{train,test}/{NORMAL,PNEUMONIA}`` layout."""


class LabelsFileError(DatasetNotFoundError):
    """A labels file that cannot be used as it is: a missing column, an unknown label, a path that is not there."""


class ReadingsFileError(PneumoscanError):
    """A file of radiologists' readings with a row pneumoscan cannot use: nothing of the file is stored."""


class UnknownPatientIdError(PneumoscanError):
    """A file name does not follow any naming scheme the patient split understands."""


class PretrainedWeightsUnavailableError(PneumoscanError):
    """Pretrained weights were asked for but are not available offline."""


class ConfigurationError(PneumoscanError):
    """A setting has a value pneumoscan cannot use."""


class TooFewSiteCases(PneumoscanError):
    """A site set too small to set an operating point on: the message gives the counts and the minimum."""


class ModelNotFoundError(PneumoscanError):
    """No usable model (checkpoint or exported folder) at the given path."""


class ModelIntegrityError(PneumoscanError):
    """A model file that does not match its card: damaged, truncated or replaced. Never served."""


class DatabaseUnavailableError(PneumoscanError):
    """The audit log cannot be written or read; the service answers nothing it cannot record."""

    http_status = 503


class InputError(PneumoscanError):
    """An input image that pneumoscan cannot or must not score; ``http_status`` for the service."""

    http_status = 422


class UnsupportedFormat(InputError):
    """The bytes are not an image format pneumoscan reads (found from the content, not the name)."""

    http_status = 415


class CorruptImage(InputError):
    """The file claims a supported format but cannot be decoded (truncated, damaged, empty)."""


class ImageTooLarge(InputError):
    """The file or its pixel count exceeds the configured limits (guards against decompression bombs)."""

    http_status = 413


class NotARadiograph(InputError):
    """A readable image that is not a projection radiograph (a CT or MR slice, a multi-frame clip, a report)."""


class DeliveryError(PneumoscanError):
    """A PACS or DICOMweb server cannot be reached now (down, refusing associations, timing out): try again later."""

    exit_code = 3


class DestinationRefused(PneumoscanError):
    """A PACS answered and refused an object: sending it again would be refused again."""

    exit_code = 3


class PacsUnavailable(DeliveryError):
    """The DICOMweb server did not answer a query or a retrieval (pull mode)."""
