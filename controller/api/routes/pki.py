"""The device CA and its CRL, for brokers the controller does not run (and for devices' operators)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response, status

from controller.api.deps import RuntimeDep, ViewerDep
from controller.api.openapi import errors
from controller.pki.service import DevicePki

router = APIRouter(prefix="/api/v1/pki", tags=["security"])
PEM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/x-pem-file": {}}, "description": "PEM"},
    **errors(_404="this controller issues no device certificates (started without --device-certificates)"),
}


def _pki(runtime: RuntimeDep) -> DevicePki:
    if runtime.pki is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "this controller issues no device certificates")
    return runtime.pki


@router.get("/ca", responses=PEM, response_class=Response)
def device_ca(runtime: RuntimeDep, _: ViewerDep) -> Response:
    """The CA that issues device certificates: a broker's ``cafile`` for client certificates."""
    return Response(_pki(runtime).authority.cert_pem, media_type="application/x-pem-file")


@router.get("/crl", responses=PEM, response_class=Response)
def device_crl(runtime: RuntimeDep, _: ViewerDep) -> Response:
    """The revoked device certificates, freshly signed (valid a week): a broker's ``crlfile``."""
    return Response(_pki(runtime).crl_pem(), media_type="application/x-pem-file")
