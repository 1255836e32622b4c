"""DICOM over TLS: the gateway's listener requires a client certificate signed by its CA, and it
sends its SR to a destination SCP over TLS. Certificates are made with openssl; both ends are
pynetdicom on real sockets."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from test_dicom_gateway import SCU, _config, _free_port, cnn, phantom  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl to make certificates")


def _certs(d: Path) -> dict[str, Path]:
    """A CA and two certificates it signs (server: localhost/127.0.0.1; client)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=hygeia-test-ca")
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else 'hygeia-client'}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _tls_scp(certs: dict[str, Path], received: list) -> tuple[object, int]:
    """A storage SCP over TLS (the destination PACS stand-in) that keeps what it receives."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["server.pem"], certs["server.key"])
    ae = AE(ae_title="TLSPACS")
    ae.supported_contexts = StoragePresentationContexts
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                             ssl_context=ctx)
    return server, port


def test_tls_listener_and_tls_destination(cnn, phantom, tmp_path):  # noqa: F811
    from pynetdicom import AE

    from hygeia_pacs import Gateway

    certs = _certs(tmp_path)
    received: list = []
    scp, scp_port = _tls_scp(certs, received)
    tls_in = {"certificate": str(certs["server.pem"]), "private_key": str(certs["server.key"]),
              "ca_certificates": str(certs["ca.pem"]), "require_client_certificate": True}
    cstore = {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": scp_port,
              "tls": {"ca_certificates": str(certs["ca.pem"]), "server_hostname": "localhost"}}
    try:
        with Gateway(_config(tmp_path, tls=tls_in, cstore=cstore), diagnoser=cnn) as gw:
            meta = pydicom.filereader.read_file_meta_info(phantom)
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca.pem"]))
            client.load_cert_chain(certs["client.pem"], certs["client.key"])
            ae = AE(ae_title=SCU)
            ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", gw.config.port, ae_title=gw.config.ae_title,
                                 tls_args=(client, "localhost"))
            assert assoc.is_established
            assert assoc.send_c_store(phantom).Status == 0x0000
            assoc.release()
            plain = AE(ae_title=SCU)  # no TLS: the listener does not even finish the association
            plain.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
            plain.acse_timeout = plain.network_timeout = 3
            assert not plain.associate("127.0.0.1", gw.config.port, ae_title=gw.config.ae_title).is_established
            end = time.time() + 60
            while not received and time.time() < end:
                time.sleep(0.1)
        assert len(received) == 1 and received[0].Modality == "SR"
    finally:
        scp.shutdown()
