"""A real PACS for the tests and benchmarks: Debian's Orthanc with its DICOMweb plugin, on loopback ports.

Each instance gets its own generated configuration, storage folder and free ports; it can
be stopped and started again on the same storage (the outage test), and is read back
through Orthanc's REST API.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
FORWARD_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "orthanc" / "forward-to-pneumoscan.lua"
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb (as .ci/run does)"


def dcmtk(tool: str) -> str | None:
    """A dcmtk program (storescu, echoscu), not pynetdicom's script of the same name that an activated venv puts
    first on PATH."""
    venv_bin = Path(sys.prefix, "bin").resolve()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin)
    return shutil.which(tool, path=path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.is_file()


class Orthanc:
    """One Orthanc server: ``start()``, ``stop()``, ``start()`` again keeps what it stored."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", forward_to: tuple[str, int] | None = None):
        """``forward_to`` (AE title, port on 127.0.0.1): route CR/DX to that node, as deploy/orthanc's script does."""
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.http_port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pneumoscan-tests",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,  # HTTP from this machine only
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "OverwriteInstances": False,  # a result sent twice is stored once (same SOP Instance UID)
            "HttpTimeout": 60,
            "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }
        if forward_to:
            config["DicomModalities"] = {"pneumoscan": [forward_to[0], "127.0.0.1", forward_to[1]]}
            config["LuaScripts"] = [str(FORWARD_SCRIPT)]
        self.config = self.folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.dicom_port}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> object:
        answer = httpx.get(f"{self.url}{path}", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def post(self, path: str, body: object) -> object:
        answer = httpx.post(f"{self.url}{path}", json=body, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def instances_of_study(self, study_instance_uid: str) -> list[dict]:
        """Every instance Orthanc holds in that study, with its tags (SOP class, modality, UIDs)."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True})
        return [{**self.get(f"/instances/{item['ID']}/simplified-tags"), "OrthancID": item["ID"]} for item in found]  # type: ignore[union-attr,dict-item]

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored file, as a viewer would fetch it."""
        answer = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30)
        answer.raise_for_status()
        return answer.content

    def upload(self, data: bytes) -> None:
        httpx.post(f"{self.url}/instances", content=data, timeout=30).raise_for_status()

    def count(self) -> int:
        return len(self.get("/instances"))  # type: ignore[arg-type]


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The "Error" lines dicom3tools' dciodvfy prints for a DICOM object (none: valid)."""
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (output.stdout + output.stderr).splitlines() if line.startswith("Error")]
