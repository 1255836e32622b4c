"""A real Orthanc PACS (Debian packages ``orthanc`` + ``orthanc-dicomweb``) for integration tests.

:class:`Orthanc` writes a JSON config (free high loopback ports, storage in a temp folder, HTTP
basic auth, the DICOMweb plugin), starts ``Orthanc CONFIG`` and waits until both its DICOM and
HTTP ports answer. ``stop()``/``start()`` keep the same storage, so a restart loses nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hygeia.serving.server import free_port  # noqa: F401  (re-exported for the gateway tests)

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "hygeia", "hygeia-test-secret"


def wait_port(port: int, timeout: float = 20.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class Orthanc:
    """One Orthanc instance with its own storage, ports and credentials."""

    aet = "ORTHANC"

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, int]] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.modalities = dict(modalities or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        cfg: dict[str, Any] = {
            "Name": "HYGEIA-TEST",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in self.modalities.items()},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "HttpTimeout": 30,
            "StorageCompression": False,
            "SaveJobs": False,
        }
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def start(self) -> "Orthanc":
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([ORTHANC_BIN, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        log.close()
        if not (wait_port(self.dicom_port) and wait_port(self.http_port)):
            self.stop()
            raise RuntimeError(f"Orthanc did not start; log:\n{self.log_path.read_text()[-3000:]}")
        end = time.time() + 20
        import requests

        while time.time() < end:  # HTTP port open is not yet "ready": wait for the REST API
            try:
                if requests.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("Orthanc REST API did not answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        # wait until the DICOM port is really closed, so "down" means down
        end = time.time() + 10
        while time.time() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.dicom_port)) != 0:
                    break
            time.sleep(0.05)

    # -- REST helpers (reading what arrived) ---------------------------------------
    def get(self, path: str) -> Any:
        import requests

        r = requests.get(f"{self.url}{path}", auth=(USER, PASSWORD), timeout=10)
        r.raise_for_status()
        return r.json()

    def instances(self) -> list[str]:
        return list(self.get("/instances"))


@pytest.fixture(scope="module")
def orthanc_bin() -> str:
    if not os.path.exists(ORTHANC_BIN) or not os.path.exists(DICOMWEB_PLUGIN):
        pytest.fail("Orthanc and orthanc-dicomweb must be installed (apt-get install orthanc orthanc-dicomweb)")
    return ORTHANC_BIN
