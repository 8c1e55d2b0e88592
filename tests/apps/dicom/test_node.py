"""The DICOM node against a real PACS (Debian's Orthanc + DICOMweb plugin, started here on loopback ports).

Instances are sent with dcmtk's storescu and pynetdicom; results are read back through
Orthanc's REST API and validated with dciodvfy (dicom3tools).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from dicom_factory import radiograph_dataset
from pacs import INSTALL_HINT, Orthanc, available, dcmtk, dciodvfy_errors, free_port
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts

from pneumoscan.apps.dicom.node import DUPLICATE, REFUSED, SCORED, DicomNode, check_listening
from pneumoscan.apps.dicom.outbox import CStoreDestination, StowDestination, parse_destination
from pneumoscan.apps.dicom.results import INDETERMINATE, NOT_FOR_DIAGNOSTIC_USE, PNEUMONIA, ModelIdentity, build_results
from pneumoscan.apps.settings import DicomNodeSettings
from pneumoscan.errors import ConfigurationError
from pneumoscan.inputs.imaging import load_xray
from pneumoscan.learning.data import list_records
from pneumoscan.running.inference import Predictor

pytestmark = pytest.mark.slow
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="module", autouse=True)
def pacs_tools() -> None:
    if not available() or not dcmtk("storescu") or not shutil.which("dciodvfy"):
        pytest.fail(f"Orthanc, dcmtk and dicom3tools are needed: {INSTALL_HINT}, apt-get install dcmtk dicom3tools")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def films(data_root: Path) -> list[Path]:
    """Kermany test films: pneumonia and normal, children."""
    records = list_records(data_root, "test")
    return [r.path for r in records if r.class_name == "PNEUMONIA"][:6] + [r.path for r in records if r.class_name == "NORMAL"][:6]


@pytest.fixture(scope="module")
def predictor(shipped_model: Path) -> Predictor:
    return Predictor.load(shipped_model)


def start_node(tmp_path: Path, predictor: Predictor, **settings: object) -> DicomNode:
    node = DicomNode(DicomNodeSettings(dicom_port=0, data_dir=tmp_path / "node", retry_max_seconds=1, **settings), predictor)
    node.start()
    return node


def send(port: int, datasets: list[Dataset], calling: str = "MODALITY", called: str = "PNEUMOSCAN") -> list[int]:
    """C-STORE each dataset in one association; the statuses (-1 where no answer came)."""
    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts
    association = ae.associate("127.0.0.1", port, ae_title=called)
    assert association.is_established, "the node refused the association"
    statuses = []
    for dataset in datasets:
        status = association.send_c_store(dataset)
        statuses.append(int(status.Status) if status else -1)
    association.release()
    return statuses


def settle(node: DicomNode, timeout: float = 60.0) -> None:
    node.jobs.join()
    if node.sender is not None:
        assert node.sender.drain(timeout), "results were not delivered"


def sr_values(report: Dataset) -> dict[str, object]:
    """Name → value of every numeric and coded item of a structured report, found anywhere in its tree."""
    values: dict[str, object] = {}

    def walk(items: object) -> None:
        for item in items or []:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "NUM":
                values[name] = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "CODE":
                values[name] = item.ConceptCodeSequence[0].CodeMeaning
            elif item.ValueType == "TEXT":
                values.setdefault(name, [])
                values[name].append(item.TextValue)  # type: ignore[union-attr]
            walk(getattr(item, "ContentSequence", None))

    walk(report.ContentSequence)
    return values


# --------------------------------------------------------------------------- result objects


def test_results_are_valid_dicom_in_the_source_study_and_say_what_the_model_said(films, predictor, tmp_path) -> None:
    source = radiograph_dataset(films[0], size=512, age_years=6)
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    loaded = load_xray(buffer.getvalue())
    prediction = predictor.predict_loaded(loaded, heatmap=True)  # PatientAge 006Y routes it to children
    model = ModelIdentity.of_predictor(predictor)
    report, capture = build_results(source, loaded.image, prediction, model)
    for obj in (report, capture):
        data = io.BytesIO()
        obj.save_as(data, enforce_file_format=True)
        assert dciodvfy_errors(data.getvalue(), tmp_path) == [], obj.SOPClassUID.name
        assert obj.StudyInstanceUID == source.StudyInstanceUID and obj.PatientID == source.PatientID
        assert obj.SeriesInstanceUID != source.SeriesInstanceUID
    values = sr_values(report)
    assert values["Calibrated probability of pneumonia"] == pytest.approx(prediction.probability)
    assert values["Decision threshold (operating point)"] == pytest.approx(prediction.threshold)
    assert values[PNEUMONIA.meaning] == ("Present" if prediction.label == "PNEUMONIA" else "Absent")
    assert values["Population whose operating point decided"] == "Child"
    assert values["Image like those the model was validated on"] == "Yes"
    parameters = " | ".join(values["Algorithm Parameters"])  # type: ignore[arg-type]
    assert model.sha256 in parameters and prediction.operating_point in parameters
    assert values["Algorithm Name"] == [model.name] * len(values["Algorithm Name"])  # type: ignore[arg-type]
    assert source.SOPInstanceUID in {str(e.value) for e in report.iterall()}  # the source image is referenced
    assert NOT_FOR_DIAGNOSTIC_USE in capture.SeriesDescription and capture.BurnedInAnnotation == "YES"
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    again = build_results(source, loaded.image, prediction, model)
    assert again.report.SOPInstanceUID == report.SOPInstanceUID  # the same instance and model: the same UIDs


def test_an_image_the_gate_flags_gets_no_verdict(predictor, tmp_path) -> None:
    import skimage

    photo = radiograph_dataset(Path(skimage.__file__).parent / "data" / "astronaut.png")
    buffer = io.BytesIO()
    photo.save_as(buffer, enforce_file_format=True)
    loaded = load_xray(buffer.getvalue())
    prediction = predictor.predict_loaded(loaded, heatmap=True)
    assert prediction.in_distribution is False
    report, capture = build_results(photo, loaded.image, prediction, ModelIdentity.of_predictor(predictor))
    values = sr_values(report)
    assert values[PNEUMONIA.meaning] == INDETERMINATE.meaning
    assert values["Image like those the model was validated on"] == "No"


# --------------------------------------------------------------------------- the node and Orthanc


def test_the_command_line_node_sends_results_to_orthanc_under_the_right_study(orthanc, films, tmp_path, shipped_model) -> None:
    port = free_port()
    env = {**os.environ, "PNEUMOSCAN_ALLOWED_CALLING_AES": "STORESCU,ECHOSCU"}
    node = subprocess.Popen([sys.executable, "-m", "pneumoscan", "dicom-node", "--port", str(port), "--model", str(shipped_model),
                             "--data-dir", str(tmp_path / "node"), "--destination", orthanc.destination],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        first = node.stdout.readline()
        assert first.startswith("pneumoscan DICOM node PNEUMOSCAN@127.0.0.1:"), first
        echo = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port)], capture_output=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        study = radiograph_dataset(films[0], size=1024, age_years=8)
        path = tmp_path / "study.dcm"
        study.save_as(path, enforce_file_format=True)
        sent = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port), str(path)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(orthanc.instances_of_study(study.StudyInstanceUID)) < 2:
            time.sleep(0.3)
        stored = orthanc.instances_of_study(study.StudyInstanceUID)
        assert sorted(i["Modality"] for i in stored) == ["OT", "SR"]
        report = pydicom.dcmread(io.BytesIO(orthanc.instance_file(next(i["OrthancID"] for i in stored if i["Modality"] == "SR"))))
        assert report.StudyInstanceUID == study.StudyInstanceUID
        assert sr_values(report)["Population whose operating point decided"] == "Child"
        refused = subprocess.run([dcmtk("storescu"), "-aet", "INTRUDER", "-aec", "PNEUMOSCAN", "127.0.0.1", str(port), str(path)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert refused.returncode != 0  # a calling AE title that is not listed: association rejected
    finally:
        node.terminate()
        out, _ = node.communicate(timeout=60)
    assert node.returncode == 0, out
    assert "stopped: 1 received, 1 scored, 0 refused, 0 duplicates, 1 delivered" in out


def test_a_pacs_that_routes_x_rays_to_the_node_gets_results_next_to_the_study(films, predictor, tmp_path) -> None:
    """The hospital's flow: a modality sends to the PACS, the PACS forwards CR/DX (deploy/orthanc's script), results come back."""
    port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", forward_to=("PNEUMOSCAN", port)).start()
    node = DicomNode(DicomNodeSettings(dicom_port=port, data_dir=tmp_path / "node", destination=pacs.destination,
                                       allowed_calling_aes=["ORTHANC"]), predictor)  # fmt: skip
    node.start()
    try:
        study = radiograph_dataset(films[9], size=512)
        path = tmp_path / "from-the-modality.dcm"
        study.save_as(path, enforce_file_format=True)
        sent = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(pacs.dicom_port), str(path)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pacs.instances_of_study(study.StudyInstanceUID)) < 3:
            time.sleep(0.3)
        assert sorted(i["Modality"] for i in pacs.instances_of_study(study.StudyInstanceUID)) == ["DX", "OT", "SR"]
        assert [row["calling_ae"] for row in node.audit.instances()] == ["ORTHANC"]
    finally:
        node.stop()
        pacs.stop()


def test_refusals_duplicates_and_malformed_instances_never_stop_the_node(orthanc, films, predictor, tmp_path) -> None:
    node = start_node(tmp_path, predictor, destination=orthanc.destination)
    try:
        good = radiograph_dataset(films[1], size=512)
        lateral = radiograph_dataset(films[2], view="LL")
        abdomen = radiograph_dataset(films[3], body_part="ABDOMEN")
        ct = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
        truncated = radiograph_dataset(films[4])
        truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
        statuses = send(node.port, [good, lateral, truncated, abdomen, ct, good])
        assert statuses == [0] * 6  # stored by the node; what it refuses is said in the audit log
        settle(node)
        rows = node.audit.instances()
        outcomes = [row["outcome"] for row in rows]
        assert sorted(outcomes) == sorted([SCORED, REFUSED, REFUSED, REFUSED, REFUSED, DUPLICATE])
        reasons = " | ".join(row["reason"] or "" for row in rows)
        assert "lateral" in reasons and "modality CT" in reasons and "not the chest" in reasons
        assert any(row["outcome"] == REFUSED and "pixel" in (row["reason"] or "").lower() for row in rows), reasons
        assert all(row["reason"] for row in rows if row["outcome"] != SCORED)
        assert next(r for r in rows if r["outcome"] == DUPLICATE)["reason"].startswith("already scored")
        assert all(len(row["sop_instance_sha256"]) == 64 and good.SOPInstanceUID not in str(row) for row in rows)  # no UID kept
        scored = next(r for r in rows if r["outcome"] == SCORED)
        assert scored["delivered_at"] is not None and node.audit.get(scored["prediction_id"])["file_type"] == "dicom"
        stored = orthanc.instances_of_study(good.StudyInstanceUID)
        assert sorted(i["Modality"] for i in stored) == ["OT", "SR"]  # once, though sent twice
        for refused in (lateral, abdomen, truncated):
            assert orthanc.instances_of_study(refused.StudyInstanceUID) == []  # no result object for a refusal
        assert send(node.port, [radiograph_dataset(films[5])]) == [0]  # still receiving after all that
        settle(node)
    finally:
        node.stop()


def test_a_pacs_outage_queues_results_on_disk_and_delivers_each_once_when_it_is_back(films, predictor, tmp_path) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    node = start_node(tmp_path, predictor, destination=pacs.destination)
    try:
        studies = [radiograph_dataset(path, size=512) for path in films[:6]]
        assert send(node.port, studies[:2]) == [0, 0]
        settle(node)
        pacs.stop()  # the PACS goes down mid-run
        assert send(node.port, studies[2:]) == [0] * 4
        node.jobs.join()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(node.outbox.pending()) < 4 or node.sender.last_error is None):
            time.sleep(0.1)  # the sender may try a moment after the last instance is filed
        assert len(node.outbox.pending()) == 4  # kept on disk, waiting
        assert node.sender.last_error is not None
        pacs.start()  # back on the same storage
        settle(node, timeout=90)
        for study in studies:
            assert sorted(i["Modality"] for i in pacs.instances_of_study(study.StudyInstanceUID)) == ["OT", "SR"]
        assert pacs.count() == 12  # none lost, none twice
        rows = node.audit.instances()
        assert len(rows) == 6 and all(row["outcome"] == SCORED and row["delivered_at"] for row in rows)
    finally:
        node.stop()
        pacs.stop()


def test_results_already_stored_and_sent_again_are_kept_once(orthanc, films, predictor, tmp_path) -> None:
    """A lost answer makes the sender try again: the same UIDs, so the PACS holds one copy."""
    node = start_node(tmp_path, predictor)  # no destination: results wait in the outbox
    study = radiograph_dataset(films[6], size=512)
    try:
        assert send(node.port, [study]) == [0]
        node.jobs.join()
        entry = node.outbox.pending()[0]
        results = node.outbox.read(entry)
        destination = parse_destination(orthanc.destination)
        destination.send(results)
        destination.send(results)  # as after a timeout that hid a success
        StowDestination(orthanc.dicomweb).send(results)
    finally:
        node.stop(timeout=1)
    assert sorted(i["Modality"] for i in orthanc.instances_of_study(study.StudyInstanceUID)) == ["OT", "SR"]


def test_the_node_can_send_results_by_stow_rs(orthanc, films, predictor, tmp_path) -> None:
    node = start_node(tmp_path, predictor, destination=orthanc.dicomweb)
    study = radiograph_dataset(films[10], size=512, modality="CR")
    try:
        assert send(node.port, [study]) == [0]
        settle(node)
    finally:
        node.stop()
    assert str(node.destination).endswith("(STOW-RS)")
    assert sorted(i["Modality"] for i in orthanc.instances_of_study(study.StudyInstanceUID)) == ["OT", "SR"]
    assert node.audit.instances()[0]["delivered_at"] is not None


def test_instances_left_in_the_spool_by_a_crash_are_scored_at_the_next_start(films, predictor, tmp_path) -> None:
    spool = tmp_path / "node" / "dicom" / "incoming"
    spool.mkdir(parents=True)
    study = radiograph_dataset(films[7], size=512)
    study.save_as(spool / "left-over.dcm", enforce_file_format=True)
    node = start_node(tmp_path, predictor)
    try:
        node.jobs.join()
        assert [row["outcome"] for row in node.audit.instances()] == [SCORED]
        assert list(spool.glob("*.dcm")) == []
    finally:
        node.stop(timeout=1)


def test_node_settings_are_checked_before_listening(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="--allow-ae"):
        check_listening(DicomNodeSettings(dicom_host="0.0.0.0", data_dir=tmp_path))
    check_listening(DicomNodeSettings(dicom_host="0.0.0.0", allowed_calling_aes="CR1, DX2", data_dir=tmp_path))
    assert DicomNodeSettings(allowed_calling_aes="CR1, DX2").allowed_calling_aes == ["CR1", "DX2"]
    assert parse_destination("ORTHANC@pacs.local:4242") == CStoreDestination("ORTHANC", "pacs.local", 4242)
    assert parse_destination("http://pacs:8042/dicom-web/") == StowDestination("http://pacs:8042/dicom-web")
    for wrong in ("pacs.local:4242", "ORTHANC@pacs", "ORTHANC@pacs:99999", "A_TITLE_LONGER_THAN_16@pacs:104"):
        with pytest.raises(ConfigurationError, match="AE_TITLE@host:port"):
            parse_destination(wrong)
    result = subprocess.run([sys.executable, "-m", "pneumoscan", "dicom-node", "--ae-title", "A" * 17, "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "ae_title" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- pull mode


def test_pull_mode_triages_new_cr_and_dx_studies_and_stores_results_back_once(orthanc, films, tmp_path, shipped_model) -> None:
    studies = [radiograph_dataset(path, size=512, modality=modality) for path, modality in zip(films[8:11], ("DX", "CR", "DX"))]
    studies[2].StudyDate = "20200101"  # before --since: not fetched
    for study in studies:
        buffer = io.BytesIO()
        study.save_as(buffer, enforce_file_format=True)
        orthanc.upload(buffer.getvalue())
    out = tmp_path / "pulled"
    command = [sys.executable, "-m", "pneumoscan", "triage", "--dicomweb", orthanc.dicomweb, "--since", "2026-11-01",
               "--out", str(out), "--model", str(shipped_model), "--store-results"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "results stored in the PACS: 2 new" in first.stdout
    worklist = (out / "worklist.csv").read_text()
    assert studies[0].StudyInstanceUID in worklist and studies[1].StudyInstanceUID in worklist
    assert studies[2].StudyInstanceUID not in worklist
    for study in studies[:2]:
        assert sorted(i["Modality"] for i in orthanc.instances_of_study(study.StudyInstanceUID)) == [study.Modality, "OT", "SR"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert ", 0 new" in again.stdout and "0 new, 2 stored before" in again.stdout  # nothing fetched or stored twice
    for study in studies[:2]:
        assert len(orthanc.instances_of_study(study.StudyInstanceUID)) == 3
    down = subprocess.run([*command[:5], "http://127.0.0.1:9/dicom-web", *command[6:]], capture_output=True, text=True, timeout=120)
    assert down.returncode == 3 and "did not answer" in down.stderr and "Traceback" not in down.stderr
