"""Results as DICOM objects a PACS files next to the study: a TID 1500 Structured Report, a heat-map Secondary Capture
and, when the model marks regions, a Grayscale Softcopy Presentation State that draws them.

Why TID 1500 (the Measurement Report, in a Comprehensive SR) and not a free comprehensive
SR: it is what IHE's AI Results profile and the commercial chest X-ray tools send, so
viewers that display AI findings read it without knowing pneumoscan. Its one measurement
group carries the finding (pneumonia present, absent, or indeterminate for an image the
gate flags), the calibrated probability and the threshold as numbers, the population and
"image like those validated" as coded evaluations, and the model's name, version, sha256
and operating point as the algorithm's identification (TID 4019). It references the
source image, and both objects live in the source's study (same Study Instance UID,
patient module copied), each in a series of its own.

Each region of the prediction (see :mod:`pneumoscan.running.regions`) is a planar ROI group (TID 1410)
of the same report: a closed polyline SCOORD on the source image (referenced by its SOP Instance
UID), with Pneumonia as its finding and the region's score as its measurement. The same boxes,
with a short label, are the graphic annotations of a GSPS (highdicom) referencing the source, so
that a PACS viewer draws them over the original film without pneumoscan's overlay. A study
without regions gets no presentation state.

The Secondary Capture is the X-ray with the heat map overlaid, with a burnt-in banner and
headers (Series Description, Image Comments) saying it is not for diagnostic use. It is
JPEG baseline (lossy, flagged so): a 1024² overlay is ~0.2 MB instead of 3.3 MB, which is
what a PACS spends its time storing (see benchmarks/dicom_node_results.md).

UIDs are derived from the source SOP Instance UID, the image's pixels and the model's sha256,
so building the results of the same instance with the same model again gives the same UIDs (a
PACS that receives them twice keeps one copy), while a different image sent under the same UID
gets results of its own.

A header value that highdicom rejects (a PatientSex of "Q", a StudyDate of "20261399") never
costs the result: the results copy a sanitised header, where such a value is left empty (the
patient and study attributes they copy are Type 2) and a missing or malformed UID is derived.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ComprehensiveSRStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from pneumoscan.running.explanation import overlay

log = logging.getLogger("pneumoscan.dicom")

MANUFACTURER = "pneumoscan"
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PR_SERIES_NUMBER = 9903
#: The heat-map picture's longest side: a picture to look at, not pixels to measure on. A 30 M-pixel film drawn whole in
#: RGB (with its banner, its array and its JPEG) would cost the node ~500 MB; at 2048 px it costs ~40 MB.
SC_MAX_SIDE = 2048

#: SNOMED CT and DICOM codes; pneumoscan's own concepts use a private scheme (99 prefix, PS3.16 8.2).
PRIVATE_SCHEME = "99PNEUMOSCAN"
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
INDETERMINATE = Code("82334004", "SCT", "Indeterminate")
PROBABILITY = Code("probability", PRIVATE_SCHEME, "Calibrated probability of pneumonia")
THRESHOLD = Code("threshold", PRIVATE_SCHEME, "Decision threshold (operating point)")
POPULATION = Code("population", PRIVATE_SCHEME, "Population whose operating point decided")
VALIDATED_IMAGE = Code("in-distribution", PRIVATE_SCHEME, "Image like those the model was validated on")
POPULATION_CODES = {"child": Code("67822003", "SCT", "Child"), "adult": Code("133936004", "SCT", "Adult")}
NO_UNITS = Code("1", "UCUM", "no units")
REGION_SCORE = Code("region-score", PRIVATE_SCHEME, "Score of the region (probability x the heat map's peak in it)")
#: The regions' colour in a viewer (the page's green, #39ff14, in CIELab).
REGION_COLOUR_LAB = (88.0, -79.0, 81.0)


@dataclass(frozen=True)
class ModelIdentity:
    """What the results name as their author: the exported model, not a person."""

    name: str
    version: str
    sha256: str

    @classmethod
    def of_predictor(cls, predictor) -> ModelIdentity:  # type: ignore[no-untyped-def]
        """The model as it runs: the sha256 is that of the ONNX file in use (fp32 or int8)."""
        card = predictor.card
        return cls(str(card.get("name", "pneumoscan")), str(card.get("pneumoscan_version", "0")), predictor.model_sha256)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class Results:
    """The two objects to send on, with the UIDs that identify them, and the source's header values left out of them."""

    report: Dataset
    heatmap: Dataset
    dropped: tuple[str, ...] = field(default=())
    presentation: Dataset | None = None  # the regions drawn for a viewer; none when the model marked no region

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.report, self.heatmap) + ((self.presentation,) if self.presentation is not None else ()))


def derived_uid(source_uid: str, model: ModelIdentity, what: str, pixels: str = "") -> UID:
    """The same source instance (and pixels), model and object give the same UID (under pydicom's root)."""
    return generate_uid(entropy_srcs=[str(source_uid), model.sha256, what, pixels])


def image_digest(image: Image.Image) -> str:
    """The sha256 of the image as decoded: the same in every lossless transfer syntax a PACS may re-send it in."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height} ".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


#: The Type 2 attributes of the patient and study modules that the results copy: empty is valid, a wrong value is not.
COPIED_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip
#: Attributes that only inform the results: dropped when unreadable.
OPTIONAL_COPIED = ("PatientAge", "PatientOrientation", "SeriesNumber", "InstanceNumber", "Laterality", "ImageLaterality",
                   "PatientWeight", "PatientSize", "SeriesDate", "SeriesTime", "ContentDate", "ContentTime")  # fmt: skip
PATIENT_SEX_VALUES = frozenset({"M", "F", "O"})
UIDS_OF_THE_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def acceptable_value(header: Dataset, keyword: str) -> bool:
    """Whether a copied attribute's value is one highdicom (and the standard) accepts; an empty one is."""
    from pydicom.valuerep import DA, DT, TM

    try:
        element = header[keyword]
        value = element.value
        if value is None or value == "":
            return True
        if element.VR in ("DA", "TM", "DT"):
            parse = {"DA": DA, "TM": TM, "DT": DT}[element.VR]
            return all(parse(str(v)) is not None for v in (value if element.VM > 1 else [value]))
        if keyword == "PatientSex":
            return str(value).strip().upper() in PATIENT_SEX_VALUES
        if keyword.endswith("UID"):
            text = str(value)
            # digits in dot-separated parts; leading zeros, which some modalities write, are kept (highdicom takes them,
            # and a derived UID would put the results in another study)
            return len(text) <= 64 and all(part.isascii() and part.isdigit() for part in text.split("."))
        str(value)  # what fails for a value pydicom cannot convert
        return True
    except Exception:  # noqa: BLE001 - a value pydicom cannot even convert is not acceptable
        return False


def result_header(source: Dataset, pixels: str, everything: bool = False) -> tuple[Dataset, tuple[str, ...]]:
    """A copy of the source's header the results can be built from, and the attributes whose values were left out.

    ``everything`` empties every copied Type 2 attribute and drops the optional ones, whatever they hold:
    the last resort when highdicom still refuses the header.
    """
    header = copy.deepcopy(source)
    dropped: list[str] = []
    for keyword in COPIED_TYPE_2:
        if keyword not in header:  # absent: highdicom copies it all the same
            setattr(header, keyword, "")
        elif everything or not acceptable_value(header, keyword):
            del header[keyword]
            setattr(header, keyword, "")
            dropped.append(keyword)
    for keyword in OPTIONAL_COPIED:
        if keyword in header and (everything or not acceptable_value(header, keyword)):
            del header[keyword]
            dropped.append(keyword)
    for keyword in UIDS_OF_THE_SOURCE:
        if keyword not in header or not acceptable_value(header, keyword) or not str(header[keyword].value):
            if keyword in header:
                del header[keyword]
            setattr(header, keyword, generate_uid(entropy_srcs=["source", keyword, pixels]))  # the same for both results
            dropped.append(keyword)
    return header, tuple(dropped)


def finding_value(prediction) -> Code:  # type: ignore[no-untyped-def]
    """An image the gate flags gets no verdict: the finding is indeterminate, whatever the number says."""
    if not prediction.validated:
        return INDETERMINATE
    return codes.SCT.Present if prediction.label == "PNEUMONIA" else codes.SCT.Absent


def algorithm_of(model: ModelIdentity, prediction) -> hd.sr.AlgorithmIdentification:  # type: ignore[name-defined]
    parameters = [
        f"model sha256 {model.sha256}",
        f"operating point {prediction.operating_point} ({prediction.operating_point_source})",
        f"threshold {prediction.threshold:.4f}",
    ]
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters, manufacturer=MANUFACTURER)


def box_outline(region, scale: tuple[float, float]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A region as a closed polyline of (column, row) points in the source image's pixel grid."""
    sx, sy = scale
    x0, y0, x1, y1 = region.x * sx, region.y * sy, (region.x + region.width) * sx, (region.y + region.height) * sy
    return np.asarray([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def region_groups(source: Dataset, prediction, model: ModelIdentity, pixels: str,  # type: ignore[no-untyped-def]
                  algorithm: hd.sr.AlgorithmIdentification, scale: tuple[float, float]) -> list:  # fmt: skip
    """One planar ROI group (TID 1410) per region: its outline on the source image, Pneumonia, and its score."""
    reference = hd.sr.SourceImageForRegion(str(source.SOPClassUID), str(source.SOPInstanceUID))
    return [
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(source.SOPInstanceUID, model, f"region {i}", pixels),
                                                         identifier=f"pneumonia region {i}"),
            referenced_region=hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                                graphic_data=box_outline(region, scale), source_image=reference),
            finding_type=PNEUMONIA,
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(REGION_SCORE, float(region.score), NO_UNITS, algorithm_id=algorithm)],
        )
        for i, region in enumerate(prediction.regions, start=1)
    ]  # fmt: skip


def grid_scale(source: Dataset, image: Image.Image) -> tuple[float, float]:
    """From the pixels the regions are given in (the image as decoded) to the source's Columns and Rows."""
    return (float(getattr(source, "Columns", image.width)) / image.width, float(getattr(source, "Rows", image.height)) / image.height)


def presentation_state(source: Dataset, image: Image.Image, prediction, model: ModelIdentity, pixels: str = "") -> Dataset | None:  # type: ignore[no-untyped-def]
    """A GSPS that draws each region's box and a short label over the source image; None without regions."""
    if not prediction.regions:
        return None
    scale = grid_scale(source, image)
    layer = hd.pr.GraphicLayer(layer_name="PNEUMOSCAN", order=1, description=f"regions marked by {model.name}"[:64],
                               display_color=hd.color.CIELabColor(*REGION_COLOUR_LAB))  # fmt: skip
    outlines = [hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=box_outline(r, scale),
                                    units=hd.pr.AnnotationUnitsValues.PIXEL) for r in prediction.regions]  # fmt: skip
    labels = [hd.pr.TextObject(text_value=f"pneumoscan: pneumonia {r.score:.2f}", units=hd.pr.AnnotationUnitsValues.PIXEL,
                               anchor_point=(float(r.x * scale[0]), float(r.y * scale[1])), anchor_point_visible=False,
                               text_justification=hd.pr.TextJustificationValues.LEFT) for r in prediction.regions]  # fmt: skip
    annotation = hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer, graphic_objects=outlines, text_objects=labels)
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=derived_uid(source.SeriesInstanceUID, model, "presentation series"),
        series_number=PR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, model, "presentation", pixels),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version,
        device_serial_number=model.sha256[:16],
        content_label="PNEUMOSCAN",
        content_description=f"regions where {model.name} sees pneumonia"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
    )
    state.BodyPartExamined = "CHEST"  # an unpaired body part: Laterality (Type 2C) stays absent
    return state


def structured_report(source: Dataset, prediction, model: ModelIdentity, pixels: str = "",  # type: ignore[no-untyped-def]
                      scale: tuple[float, float] = (1.0, 1.0)) -> Dataset:  # fmt: skip
    """The TID 1500 Measurement Report of one scored image, in the source's study; ``scale`` places its regions."""
    report = comprehensive_sr(
        source,
        measurement_report(source, prediction, model, pixels, scale),
        series_instance_uid=derived_uid(source.SeriesInstanceUID, model, "report series"),
        sop_instance_uid=derived_uid(source.SOPInstanceUID, model, "report", pixels),
        series_description=f"pneumoscan AI result ({model.name})"[:64],
    )
    report.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    return report


def measurement_report(source: Dataset, prediction, model: ModelIdentity, pixels: str,  # type: ignore[no-untyped-def]
                       scale: tuple[float, float]) -> Dataset:  # fmt: skip
    """The report's content tree (TID 1500), built by highdicom's templates: its root container item."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(model.sha256, model, "device"), name=model.name, manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}",
        ),
    )
    evaluations = [hd.sr.QualitativeEvaluation(PNEUMONIA, finding_value(prediction))]
    if prediction.population in POPULATION_CODES:
        evaluations.append(hd.sr.QualitativeEvaluation(POPULATION, POPULATION_CODES[prediction.population]))
    if prediction.in_distribution is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(VALIDATED_IMAGE, codes.SCT.Yes if prediction.in_distribution else codes.SCT.No))
    algorithm = algorithm_of(model, prediction)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(source.SOPInstanceUID, model, "finding", pixels),
                                                     identifier="pneumonia"),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=[
            hd.sr.Measurement(PROBABILITY, float(prediction.probability), NO_UNITS, algorithm_id=algorithm),
            hd.sr.Measurement(THRESHOLD, float(prediction.threshold), NO_UNITS),
        ],
        qualitative_evaluations=evaluations,
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group, *region_groups(source, prediction, model, pixels, algorithm, scale)],
    )
    return content[0]


def comprehensive_sr(source: Dataset, content: Dataset, series_instance_uid: str, sop_instance_uid: str,
                     series_description: str) -> Dataset:  # fmt: skip
    """The complete Comprehensive SR document that ``hd.sr.ComprehensiveSR(evidence=[source], content=content, ...,
    series_number=SR_SERIES_NUMBER, instance_number=1, manufacturer=MANUFACTURER, is_complete=True)`` builds, at a third
    of its cost.

    highdicom's constructor deep-copies the content tree, parses the copy back into content items and searches the tree
    twice for the instances it references: checks of a tree its own templates have just built, and about a third of the
    time a study's results took in the DICOM node (24 of 71 ms). Here the document modules come from
    highdicom's :class:`~highdicom.SOPClass` and the one piece of evidence is the source; a test keeps the two objects
    equal element for element.
    """
    document = hd.SOPClass(
        study_instance_uid=source.StudyInstanceUID, series_instance_uid=series_instance_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid, sop_class_uid=ComprehensiveSRStorage, instance_number=1, modality="SR",
        manufacturer=MANUFACTURER, transfer_syntax_uid=ExplicitVRLittleEndian, patient_id=source.PatientID,
        patient_name=source.PatientName, patient_birth_date=source.PatientBirthDate, patient_sex=source.PatientSex,
        accession_number=source.AccessionNumber, study_id=source.StudyID, study_date=source.StudyDate,
        study_time=source.StudyTime, referring_physician_name=getattr(source, "ReferringPhysicianName", None),
        specific_character_set=source.get("SpecificCharacterSet"), series_description=series_description,
    )  # fmt: skip
    document.CompletionFlag, document.VerificationFlag, document.PreliminaryFlag = "COMPLETE", "UNVERIFIED", "PRELIMINARY"
    for tag, value in content.items():
        document[tag] = value
    document.CurrentRequestedProcedureEvidenceSequence = [instance_reference(source)]
    document.PerformedProcedureCodeSequence = []
    document.ReferencedPerformedProcedureStepSequence = []
    document.copy_patient_and_study_information(source)
    document.ContributingEquipmentSequence = [*acquisition_equipment(source), hd.ContributingEquipment.for_highdicom()]
    return document


def instance_reference(source: Dataset) -> Dataset:
    """The source as one item of a hierarchical SOP instance reference (study, series, instance)."""
    instance = Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = source.SeriesInstanceUID, [instance]
    study = Dataset()
    study.StudyInstanceUID, study.ReferencedSeriesSequence = source.StudyInstanceUID, [series]
    return study


def acquisition_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The modality that made the source, as highdicom names it; none when the header does not say enough."""
    try:
        return [hd.ContributingEquipment.for_image_acquisition(source)]
    except Exception:  # noqa: BLE001 - highdicom leaves it out on any failure too
        return []


def coding_scheme_identification() -> Dataset:
    """Names the private coding scheme of pneumoscan's own concepts, as PS3.3 C.12.1.1.2 asks."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "pneumoscan concepts"
    item.CodingSchemeResponsibleOrganization = "the pneumoscan project"
    return item


def banner(picture: Image.Image, text: str) -> Image.Image:
    """The picture with a black band on top that carries ``text``, so a screenshot keeps the warning."""
    height = max(24, picture.height // 20)
    font = ImageFont.load_default(size=int(height * 0.6))
    canvas = Image.new("RGB", (picture.width, picture.height + height), "black")
    canvas.paste(picture.convert("RGB"), (0, height))
    ImageDraw.Draw(canvas).text((height // 3, height // 5), text, fill=(255, 255, 0), font=font)
    return canvas


def heatmap_capture(source: Dataset, image: Image.Image, prediction, model: ModelIdentity, pixels: str = "") -> Dataset:  # type: ignore[no-untyped-def]
    """The heat-map overlay as a Secondary Capture in the source's study, labelled not for diagnostic use."""
    verdict = "not validated for this image" if not prediction.validated else prediction.label.lower()
    text = f"{NOT_FOR_DIAGNOSTIC_USE} - pneumoscan heat map - p={prediction.probability:.2f} ({verdict})"
    picture = image.copy() if max(image.size) > SC_MAX_SIDE else image
    picture.thumbnail((SC_MAX_SIDE, SC_MAX_SIDE))
    drawn = np.asarray(banner(overlay(picture, prediction.heatmap), text), dtype=np.uint8)
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=drawn,
        photometric_interpretation="YBR_FULL_422",  # JPEG baseline: a picture, not pixels to measure on
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(source.SeriesInstanceUID, model, "heat map series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, model, "heat map", pixels),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=patient_orientation(source),
        transfer_syntax_uid=JPEGBaseline8Bit,
    )
    capture.SeriesDescription = f"pneumoscan heat map - {NOT_FOR_DIAGNOSTIC_USE}"[:64]
    capture.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: where {model.name} looked; the finding is in the structured report"
    capture.BodyPartExamined = "CHEST"  # an unpaired body part: Laterality (Type 2C) stays absent
    capture.BurnedInAnnotation = "YES"
    capture.LossyImageCompression, capture.LossyImageCompressionMethod = "01", "ISO_10918_1"
    capture.ConversionType = "WSD"
    capture.DerivationDescription = f"heat map of {model.name} {model.version} overlaid on the source image"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    return capture


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """The source's orientation when it says one; a frontal chest film's (patient's left, feet) otherwise."""
    value = getattr(source, "PatientOrientation", None)
    if value and len(value) == 2:
        return (str(value[0]), str(value[1]))
    return ("L", "F")


def build_results(source: Dataset, image: Image.Image, prediction, model: ModelIdentity) -> Results:  # type: ignore[no-untyped-def]
    """Both result objects of one scored instance (the prediction must carry its heat map), whatever its header holds.

    Built from a sanitised copy of the header (:func:`result_header`); should highdicom still refuse
    it, every copied patient and study value is left empty and the results are built again.
    """
    pixels = image_digest(image)
    header, dropped = result_header(source, pixels)
    try:
        return results_of(header, image, prediction, model, pixels, dropped)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        log.warning("the results could not copy the source's header (%s): its patient and study values are left empty",
                    str(exc)[:200])  # fmt: skip
        header, dropped = result_header(source, pixels, everything=True)
        return results_of(header, image, prediction, model, pixels, dropped)


def results_of(header: Dataset, image: Image.Image, prediction, model: ModelIdentity, pixels: str,  # type: ignore[no-untyped-def]
               dropped: tuple[str, ...]) -> Results:  # fmt: skip
    return Results(structured_report(header, prediction, model, pixels, grid_scale(header, image)),
                   heatmap_capture(header, image, prediction, model, pixels), dropped,
                   presentation_state(header, image, prediction, model, pixels))  # fmt: skip
